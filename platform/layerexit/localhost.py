"""Loopback helpers for things we start on this machine (Serve, MLflow, Ray heads): a free port, and polling until
a started service answers."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable


def free_port() -> int:
    """A TCP port nothing listens on right now (bound and released; a race with other starters is possible)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5,
               alive: Callable[[], None] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; exceptions count as "not yet".
    ``alive`` is called first on every round and should raise if what we wait on has died."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if alive is not None:
            alive()
        try:
            last = predicate()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - keep polling until the deadline
            last = err
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
