"""A free loopback port, for `lorafleet up`, the tests and the benchmarks (one copy; there were four)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the caller binds it soon after; another process could take it in between)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
