"""Undo handlers for resources the core layer creates: processes, files, sockets, directories, cgroups."""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcvm.core.proc import ProcessRef, kill_group


def _process(data: dict[str, Any]) -> None:
    pid = int(data["pid"])
    ProcessRef(pid, int(data["start"])).terminate(timeout=float(data.get("grace", 5)))
    if data.get("group"):
        # What the leader spawned may outlive it. While any member lives, the kernel never hands out the
        # group's id as a new pid, so a group that still exists is the one we journaled.
        kill_group(pid)


def _path(data: dict[str, Any]) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(data["path"]).unlink()


def _tree(data: dict[str, Any]) -> None:
    shutil.rmtree(data["path"], ignore_errors=True)


def _cgroup(data: dict[str, Any]) -> None:
    """rmdir a cgroup; its last members may still be leaving it just after they were killed."""
    path = Path(data["path"])
    deadline = time.monotonic() + 5
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


HANDLERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "process": _process,
    "file": _path,
    "socket": _path,
    "dir": _tree,
    "cgroup": _cgroup,
}
