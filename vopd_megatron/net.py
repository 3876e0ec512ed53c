"""A free local TCP port, for the rendezvous of processes this package starts
itself (a 1-process group outside torchrun, the gloo test pool, benchmarks)."""
from __future__ import annotations

import socket


def free_local_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
