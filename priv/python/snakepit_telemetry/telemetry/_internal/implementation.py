"""Which implementation runs the default stream: the native extension or pure Python.

``SNAKEPIT_TELEMETRY_IMPLEMENTATION`` is read once, when the package is imported:

* ``auto`` (the default; also any unknown value, logged at debug level): the
  native extension module ``snakepit_telemetry._native`` (Rust, built by
  ``script/build-python-ext``) when it imports, else pure Python;
* ``native``: the extension; when it is not built (or fails to import) the
  package logs one warning and runs pure Python, it never raises;
* ``python``: pure Python; the extension is not even imported.

:func:`name` tells which was chosen; :func:`reason` says why it is ``python``,
for error messages.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

__all__ = ["IMPLEMENTATION_ENV", "NATIVE", "PYTHON", "name", "native", "reason"]

log = logging.getLogger(__name__)

IMPLEMENTATION_ENV = "SNAKEPIT_TELEMETRY_IMPLEMENTATION"
NATIVE = "native"
PYTHON = "python"
_CHOICES = ("auto", NATIVE, PYTHON)


def _load() -> tuple[ModuleType | None, str]:
    """The extension module (or ``None``) and, without it, why not."""
    raw = os.environ.get(IMPLEMENTATION_ENV, "")
    wanted = raw.strip().lower() or "auto"
    if wanted not in _CHOICES:
        log.debug("ignoring %s=%r: expected auto, native or python", IMPLEMENTATION_ENV, raw)
        wanted = "auto"
    if wanted == PYTHON:
        return None, f"{IMPLEMENTATION_ENV}=python"
    try:
        from ... import _native  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, or a broken build (wrong ABI, missing symbol)
        why = f"snakepit_telemetry._native is not importable ({type(exc).__name__}: {exc})"
        if wanted == NATIVE:
            log.warning(
                "telemetry: %s=native but %s; using the python implementation "
                "(build the extension with script/build-python-ext)",
                IMPLEMENTATION_ENV,
                why,
            )
        return None, why
    return _native, ""


_native, _reason = _load()


def native() -> ModuleType | None:
    """The extension module when the native implementation was chosen, else ``None``."""
    return _native


def name() -> str:
    """``"native"`` or ``"python"``: the implementation chosen at import."""
    return NATIVE if _native is not None else PYTHON


def reason() -> str:
    """Why the python implementation runs (empty when it is the native one)."""
    return _reason
