"""Immutable control state applied on the emit path.

The state is swapped as a whole (a single reference assignment), so emitters read
a consistent snapshot without taking a lock.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ... import snakepit_bridge_pb2 as pb

log = logging.getLogger(__name__)

# The same bound as Snakepit.Telemetry.Control keeps, so both drop the same
# oldest rule and a replay after reconnect fits the NIF's control buffer.
MAX_RULES = 32
ENABLED_ENV = "SNAKEPIT_TELEMETRY_ENABLED"
SAMPLING_RATE_ENV = "SNAKEPIT_TELEMETRY_SAMPLING_RATE"
ALLOW_ENV = "SNAKEPIT_TELEMETRY_ALLOW"
DENY_ENV = "SNAKEPIT_TELEMETRY_DENY"
# Per-state memo of name -> rate; reset when full so random names stay bounded.
_RATE_CACHE_LIMIT = 4096


def _glob_source(patterns: Iterable[str]) -> str | None:
    parts = [f"(?:{fnmatch.translate(p)})" for p in patterns if isinstance(p, str)]
    return "|".join(parts) if parts else None


def compile_globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """Fold fnmatch globs into one regex so matching costs a single ``match`` call."""
    source = _glob_source(patterns)
    return re.compile(source) if source is not None else None


def clamp_rate(rate: float) -> float:
    """Clamp into [0, 1]; NaN means "no usable rate", so keep everything."""
    if math.isnan(rate):
        return 1.0
    return min(1.0, max(0.0, rate))


@dataclass(frozen=True, slots=True)
class SamplingRule:
    """One sampling rule: ``rate`` for events matching any of ``patterns``."""

    rate: float
    patterns: tuple[str, ...]


def _compile_rules(
    rules: tuple[SamplingRule, ...],
) -> tuple[re.Pattern[str] | None, dict[str, float]]:
    """One regex for all rules, newest first, so the first alternative to match wins.

    Each rule is a named group ``r<index>``; ``match.lastgroup`` is that outer group
    (it closes last), which maps back to the rule's rate in a single ``match`` call.
    """
    alternatives = []
    rates: dict[str, float] = {}
    for index in range(len(rules) - 1, -1, -1):
        source = _glob_source(rules[index].patterns)
        if source is None:
            continue
        group = f"r{index}"
        alternatives.append(f"(?P<{group}>{source})")
        rates[group] = rules[index].rate
    if not alternatives:
        return None, rates
    return re.compile("|".join(alternatives)), rates


@dataclass(frozen=True, slots=True)
class ControlState:
    """Toggle, sampling and filter settings, as set by env defaults and Elixir.

    Sampling semantics (Elixir re-sends its whole state on every new call, so
    updates combine rather than replace each other):

    * an update with empty ``event_patterns`` sets ``default_rate``, the rate for
      events that no rule matches (initially 1.0);
    * an update with patterns sets a rule ``(rate, patterns)``. A rule whose
      pattern list equals an existing one (same patterns, same order) replaces it
      and moves to the end; otherwise it is appended. At most ``MAX_RULES`` rules
      are kept; the oldest are dropped (the caller counts ``controls_truncated``);
    * an event's rate is that of the last (most recently set) rule with a pattern
      matching its dotted name, else ``default_rate``;
    * rates are clamped into [0, 1], and NaN means 1.0.

    A filter update replaces both allow and deny lists; deny wins over allow and
    an empty allow list allows everything. A toggle sets ``enabled``.
    """

    enabled: bool = True
    default_rate: float = 1.0
    rules: tuple[SamplingRule, ...] = ()
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # Derived in __post_init__ so the emit path only reads precomputed values.
    sampling: bool = field(init=False, compare=False, repr=False)
    filtering: bool = field(init=False, compare=False, repr=False)
    _rules_re: re.Pattern[str] | None = field(init=False, compare=False, repr=False)
    _rule_rates: dict[str, float] = field(init=False, compare=False, repr=False)
    _allow_re: re.Pattern[str] | None = field(init=False, compare=False, repr=False)
    _deny_re: re.Pattern[str] | None = field(init=False, compare=False, repr=False)
    _rate_cache: dict[str, float] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        rules_re, rule_rates = _compile_rules(self.rules)
        allow_re = compile_globs(self.allow)
        deny_re = compile_globs(self.deny)
        setter = object.__setattr__
        setter(self, "_rules_re", rules_re)
        setter(self, "_rule_rates", rule_rates)
        setter(self, "_allow_re", allow_re)
        setter(self, "_deny_re", deny_re)
        setter(self, "_rate_cache", {})
        # All rates 1.0 means every event's rate is 1.0: emit can skip sampling.
        sampling = self.default_rate < 1.0 or any(r.rate < 1.0 for r in self.rules)
        setter(self, "sampling", sampling)
        setter(self, "filtering", allow_re is not None or deny_re is not None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ControlState:
        """The default state from environment variables; bad values fall back, never raise."""
        return cls(
            enabled=_env_bool(environ, ENABLED_ENV, True),
            default_rate=_env_rate(environ, SAMPLING_RATE_ENV, 1.0),
            allow=_env_globs(environ, ALLOW_ENV),
            deny=_env_globs(environ, DENY_ENV),
        )

    def allowed(self, name: str) -> bool:
        """Deny wins over allow; an empty allow list allows everything."""
        if self._deny_re is not None and self._deny_re.match(name):
            return False
        return self._allow_re is None or self._allow_re.match(name) is not None

    def sample_rate_for(self, name: str) -> float:
        """Rate of the newest rule matching ``name``, else the default rate."""
        cache = self._rate_cache
        rate = cache.get(name)
        if rate is not None:
            return rate
        rate = self.default_rate
        if self._rules_re is not None:
            match = self._rules_re.match(name)
            if match is not None and match.lastgroup is not None:
                rate = self._rule_rates[match.lastgroup]
        if len(cache) >= _RATE_CACHE_LIMIT:
            cache.clear()
        cache[name] = rate
        return rate

    def apply(self, control: pb.TelemetryControl) -> tuple[ControlState, int] | None:
        """State after ``control`` plus the number of rules truncated away.

        ``None`` means the control carries nothing usable.
        """
        which = control.WhichOneof("control")
        if which == "toggle":
            return replace(self, enabled=control.toggle.enabled), 0
        if which == "sampling":
            return self._with_sampling(control.sampling)
        if which == "filter":
            allow = tuple(control.filter.allow)
            deny = tuple(control.filter.deny)
            return replace(self, allow=allow, deny=deny), 0
        return None

    def _with_sampling(self, update: pb.TelemetrySamplingUpdate) -> tuple[ControlState, int]:
        rate = clamp_rate(update.sampling_rate)
        patterns = tuple(update.event_patterns)
        if not patterns:
            return replace(self, default_rate=rate), 0
        rules = [r for r in self.rules if r.patterns != patterns]
        rules.append(SamplingRule(rate, patterns))
        truncated = max(0, len(rules) - MAX_RULES)
        return replace(self, rules=tuple(rules[truncated:])), truncated

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view for stats and debugging; rules oldest first."""
        return {
            "enabled": self.enabled,
            "default_rate": self.default_rate,
            "rules": [{"rate": r.rate, "patterns": list(r.patterns)} for r in self.rules],
            "allow": list(self.allow),
            "deny": list(self.deny),
        }


def _env_bool(environ: Mapping[str, str], key: str, default: bool) -> bool:
    raw = environ.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value == "true":
        return True
    if value == "false":
        return False
    log.debug("ignoring %s=%r: expected 'true' or 'false'", key, raw)
    return default


def _env_rate(environ: Mapping[str, str], key: str, default: float) -> float:
    """A finite rate in [0, 1]; anything else is a misconfiguration and falls back.

    Falling back to 1.0 (rather than clamping, as controls do) means a typo such as
    ``-1`` cannot silently drop every event.
    """
    raw = environ.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        rate = float(raw)
    except ValueError:
        rate = math.nan
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        log.debug("ignoring %s=%r: expected a number in [0, 1]", key, raw)
        return default
    return rate


def _env_globs(environ: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = environ.get(key) or ""
    return tuple(p for p in (part.strip() for part in raw.split(",")) if p)
