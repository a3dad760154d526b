"""Compatibility name for :mod:`snakepit_telemetry`, and only when Snakepit's is absent.

This project's Python package is ``snakepit_telemetry``. Code written against its
old name keeps working: ``from snakepit_bridge import telemetry`` or
``import snakepit_bridge.telemetry.stream`` give the very same module objects as
``snakepit_telemetry.telemetry`` / ``snakepit_telemetry.telemetry.stream`` (one
process-wide stream, not a copy), through a finder that maps every
``snakepit_bridge.<name>`` to ``snakepit_telemetry.<name>``.

Snakepit ships its own top-level ``snakepit_bridge`` package, a regular package
that its worker (``grpc_server.py``, adapters) imports. When that package is also
on ``sys.path``, after this one or before it, Snakepit's wins: this module finds
it and loads it in its own place, so ``import snakepit_bridge`` is Snakepit's
whatever the order of the path entries, and this project is reached as
``snakepit_telemetry`` only. (If Snakepit's comes first on the path, this file
is never imported at all.)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_TARGET = "snakepit_telemetry"
_OWN_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _other_snakepit_bridge() -> importlib.machinery.ModuleSpec | None:
    """Spec of a regular ``snakepit_bridge`` package elsewhere on ``sys.path``, if any."""
    entries = []
    for entry in sys.path:
        try:
            same = os.path.samefile(entry or os.curdir, _OWN_ROOT)
        except OSError:
            same = False  # missing directory, zip file: not ours either way
        if not same:
            entries.append(entry)
    spec = importlib.machinery.PathFinder.find_spec(__name__, entries)
    if spec is None or spec.origin is None or spec.loader is None:
        return None  # nothing, or a bare namespace directory
    return spec


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``snakepit_bridge.<name>`` as the already imported ``snakepit_telemetry.<name>``."""

    _PREFIX = __name__ + "."

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self._PREFIX) or sys.modules.get(__name__) is not _SHIM:
            return None
        real = importlib.import_module(_TARGET + fullname[len(__name__) :])
        return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(real, "__path__"))

    def create_module(self, spec):
        real = sys.modules[_TARGET + spec.name[len(__name__) :]]
        # The import system sets ``__spec__`` on what this returns; keep the real one.
        spec.loader_state = real.__spec__
        return real

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


_SHIM = sys.modules[__name__]
_other = _other_snakepit_bridge()

if _other is not None:
    _module = importlib.util.module_from_spec(_other)
    sys.modules[__name__] = _module  # the import statement returns what is here now
    try:
        _other.loader.exec_module(_module)
    except BaseException:
        del sys.modules[__name__]
        raise
else:
    from snakepit_telemetry import __version__

    __all__ = ["__version__"]
    __path__: list[str] = []  # submodules come from _AliasFinder only
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
