"""The one way fcvm waits for something to become true: poll with a deadline, never forever."""

from __future__ import annotations

import time
from collections.abc import Callable

from fcvm.core.errors import FcvmError


def wait_until(condition: Callable[[], object], timeout: float, *, interval: float = 0.02) -> bool:
    """Poll `condition` until it is truthy or `timeout` seconds pass; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(interval)
    return True


def wait_for(condition: Callable[[], object], timeout: float, what: str, *, interval: float = 0.02) -> None:
    """`wait_until`, raising an error that names `what` on timeout."""
    if not wait_until(condition, timeout, interval=interval):
        raise FcvmError(f"timed out after {timeout:g} s waiting for {what}")
