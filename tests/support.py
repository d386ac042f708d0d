"""Shared test helpers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, reason: str) -> None:
    """Skip (printing why) when a prerequisite is missing; in CI a missing prerequisite is a failure,
    so the `root` and `vm` tiers can never pass by skipping."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_tool(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None, f"needs {name} on PATH")


NOBODY = 65534


def as_other_user(action: Callable[[], object], uid: int = NOBODY) -> str:
    """Run `action` in a forked child as `uid` (gid the same, no groups): another local user attacking.
    Returns "ok: <its result>", or "<OSError subclass>: <strerror>" when it raised one."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                outcome = f"ok: {action()!r}"
            except OSError as exc:
                outcome = f"{type(exc).__name__}: {exc.strerror}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome
