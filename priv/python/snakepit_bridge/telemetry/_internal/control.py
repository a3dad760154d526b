"""Immutable control state applied on the emit path.

The state is swapped as a whole (a single reference assignment), so emitters read
a consistent snapshot without taking a lock.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ... import snakepit_bridge_pb2 as pb


def compile_globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """Fold fnmatch globs into one regex so matching costs a single ``match`` call."""
    parts = [f"(?:{fnmatch.translate(p)})" for p in patterns if isinstance(p, str)]
    return re.compile("|".join(parts)) if parts else None


def clamp_rate(rate: float) -> float:
    """Clamp into [0, 1]; NaN means "no usable rate", so keep everything."""
    if math.isnan(rate):
        return 1.0
    return min(1.0, max(0.0, rate))


@dataclass(frozen=True, slots=True)
class ControlState:
    """Toggle, sampling and filter settings as last set by Elixir."""

    enabled: bool = True
    sampling_rate: float = 1.0
    sampling_match: re.Pattern[str] | None = None
    allow: re.Pattern[str] | None = None
    deny: re.Pattern[str] | None = None

    @property
    def filtering(self) -> bool:
        """Whether any filter is active (lets emit skip name matching entirely)."""
        return self.allow is not None or self.deny is not None

    def allowed(self, name: str) -> bool:
        """Deny wins over allow; an empty allow list allows everything."""
        if self.deny is not None and self.deny.match(name):
            return False
        return self.allow is None or self.allow.match(name) is not None

    def sample_rate_for(self, name: str) -> float:
        """Rate for ``name``: the sampling rate if its patterns match (or are empty)."""
        if self.sampling_match is None or self.sampling_match.match(name):
            return self.sampling_rate
        return 1.0

    def apply(self, control: pb.TelemetryControl) -> ControlState | None:
        """Return the state after ``control``, or ``None`` if it carries nothing usable."""
        which = control.WhichOneof("control")
        if which == "toggle":
            return replace(self, enabled=control.toggle.enabled)
        if which == "sampling":
            update = control.sampling
            return replace(
                self,
                sampling_rate=clamp_rate(update.sampling_rate),
                sampling_match=compile_globs(update.event_patterns),
            )
        if which == "filter":
            return replace(
                self,
                allow=compile_globs(control.filter.allow),
                deny=compile_globs(control.filter.deny),
            )
        return None
