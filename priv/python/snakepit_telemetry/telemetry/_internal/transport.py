"""Binding the worker's telemetry address, privately when it is a unix socket.

Where the worker and the BEAM share a host, a unix socket in a directory only
the owning user can enter (0700), itself 0600, is the preferred telemetry
address: no other user can connect to it at all (``Snakepit.Telemetry.Config
.socket_path/1`` makes such a directory on the Elixir side). TCP stays
available (``host:port``); there, the per-worker secret (:mod:`.auth`) is what
keeps other local processes out.
"""

from __future__ import annotations

import logging
import os
import stat

import grpc

__all__ = ["add_port"]

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]", "::", "localhost")


def add_port(server: grpc.Server, address: str) -> str:
    """Bind ``address`` on ``server`` and return the address to give Elixir.

    ``unix:/abs/path.sock``: the parent directory is created 0700 if missing (a
    warning is logged when it exists and other users may enter it), a stale
    socket left by a crashed run is removed, and the new socket is made 0600.
    ``host:port`` (port 0: any free one): bound as given; the returned address
    names the port chosen. Raises ``ValueError`` for a malformed address and
    ``RuntimeError`` when it cannot be bound.
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not os.path.isabs(path):
            raise ValueError(f"unix socket path must be absolute: {address}")
        _private_dir(os.path.dirname(path))
        try:  # a stale socket from a crashed run would make the bind fail
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        server.add_insecure_port(f"unix:{path}")
        # grpc creates the socket when binding; only the owner may connect.
        os.chmod(path, 0o600)
        return f"unix:{path}"
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT or unix:/abs/path.sock, got {address!r}")
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    shown = "127.0.0.1" if host in _WILDCARD_HOSTS else host
    return f"{shown}:{port}"


def _private_dir(directory: str) -> None:
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        return
    if info.st_mode & 0o077:
        log.warning(
            "telemetry: the socket directory %s is open to other users (mode %o); "
            "a private directory (0700) keeps them from reaching the socket at all",
            directory,
            stat.S_IMODE(info.st_mode),
        )
