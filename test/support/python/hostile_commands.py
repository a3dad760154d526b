"""Test-only commands for ``support/python/command_worker.py``: ``hostile``.

Loaded with ``command_worker.py --commands test/support/python/hostile_commands.py``
(``atom_safety_test.exs``, ``priv/python/tests/test_worker.py``); demo and bench
workers run without it.

* ``hostile`` {count: N, seed: S, invalid: M, oversized_every: K} emits N
  decoder-hostile events fast (only every K-th ``oversized`` slot stays oversized,
  the others become ``unknown_name``; K defaults to 1),
  rotating ``unknown_name`` (unique random 3-part names, and unique 20-part names,
  which Python accepts), ``unknown_keys`` (``python.call.stop`` with unique random
  metadata and measurement keys), ``oversized`` (100 KB metadata value, or 10 KB
  metadata and measurement keys) and ``bad_values`` (NaN/inf measurements, or
  nested dicts as values, which emit drops/stringifies) -> {"count": N, "kinds":
  {"unknown_name": a, "unknown_keys": b, "oversized": c, "bad_values": d}}. Names
  with empty parts cannot leave Python (emit drops them as invalid); ``invalid: M``
  additionally tries M of them (not part of N) and adds ``"invalid": M`` to the ACK.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from snakepit_telemetry.telemetry import emit

HOSTILE_KINDS = ("unknown_name", "unknown_keys", "oversized", "bad_values")
_BIG_VALUE = "v" * 100_000
_BIG_KEY = "k" * 10_000


def _int_arg(cmd: dict[str, Any], key: str, default: int) -> int:
    """A non-negative int argument; anything else is an error ACK."""
    value = cmd.get(key, default)
    if type(value) is not int or value < 0:
        raise ValueError(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


def hostile(cmd: dict[str, Any]) -> dict[str, Any]:
    """Events meant to stress the Elixir-side decoder; see the module docstring."""
    count = _int_arg(cmd, "count", 100)
    seed = cmd.get("seed", 0)
    if type(seed) is not int:
        raise ValueError(f"'seed' must be an integer, got {seed!r}")
    invalid = _int_arg(cmd, "invalid", 0)
    oversized_every = max(1, _int_arg(cmd, "oversized_every", 1))
    rng = random.Random(seed)

    def tok() -> str:
        return f"{rng.getrandbits(64):016x}"

    kinds = dict.fromkeys(HOSTILE_KINDS, 0)
    for i in range(count):
        kind = HOSTILE_KINDS[i % len(HOSTILE_KINDS)]
        if kind == "oversized" and (i // len(HOSTILE_KINDS)) % oversized_every:
            # Large payloads are slow to move; `oversized_every` thins them out.
            kind = "unknown_name"
        kinds[kind] += 1
        alternate = (i // len(HOSTILE_KINDS)) % 2 == 1
        if kind == "unknown_name":
            if alternate:
                emit(".".join(f"p{tok()}" for _ in range(20)), {"x": 1})
            else:
                emit(f"zz.{tok()}.{tok()}", {f"m_{tok()}": 1}, {f"k_{tok()}": "v"})
        elif kind == "unknown_keys":
            emit("python.call.stop", {"duration": 1, f"m_{tok()}": 1}, {f"k_{tok()}": "v"})
        elif kind == "oversized":
            if alternate:
                emit("python.call.stop", {"duration": 1, _BIG_KEY: 1}, {_BIG_KEY: "v"})
            else:
                emit("python.call.stop", {"duration": 1}, {"command": _BIG_VALUE})
        elif alternate:
            nested = {"nested": {"deep": [1, 2]}}
            emit("python.call.stop", {"duration": nested, "other": 1}, {"command": nested})
        else:
            emit(
                "python.call.stop",
                {"duration": math.nan, "pos_inf": math.inf, "neg_inf": -math.inf},
            )
    result: dict[str, Any] = {"count": count, "kinds": kinds}
    if "invalid" in cmd:
        bad_names = ("python..stop", ".python.call", "python.call.", "")
        for i in range(invalid):
            emit(bad_names[i % len(bad_names)], {"duration": 1})
        result["invalid"] = invalid
    return result


COMMANDS: dict[str, Callable[[dict[str, Any]], Any]] = {"hostile": hostile}
