"""Undo handlers for resources the core layer creates: processes, files, sockets, directories."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcvm.core.proc import ProcessRef


def _process(data: dict[str, Any]) -> None:
    ProcessRef(int(data["pid"]), int(data["start"])).terminate(timeout=float(data.get("grace", 5)))


def _path(data: dict[str, Any]) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(data["path"]).unlink()


def _tree(data: dict[str, Any]) -> None:
    shutil.rmtree(data["path"], ignore_errors=True)


HANDLERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "process": _process,
    "file": _path,
    "socket": _path,
    "dir": _tree,
}
