"""Undo handlers for resources the core layer creates: processes, files, sockets, directories, cgroups."""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcvm.core.proc import ProcessRef, group_of, kill_group


def _process(data: dict[str, Any]) -> None:
    """Stop a journaled process and, with `group`, whatever it spawned into its process group.

    The group is signalled only if the journaled process itself (same pid *and* start time) was seen leading
    it: after a reboot or pid reuse its old pid may lead a stranger's group. Raises while anything of it still
    runs, so the entry stays for the next attempt and the VM is not reported exited."""
    ref = ProcessRef(int(data["pid"]), int(data["start"]))
    # Looked at before it is signalled: once it has exited, nothing proves its pid still names its group.
    group = group_of(ref) if data.get("group") else frozenset()
    if not ref.terminate(timeout=float(data.get("grace", 5))):
        raise RuntimeError(f"pid {ref.pid} is still running after SIGKILL")
    if group and not kill_group(ref.pid, group):
        raise RuntimeError(f"process group {ref.pid} is still running after SIGKILL")


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
