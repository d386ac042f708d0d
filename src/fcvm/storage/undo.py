"""Undo handlers for storage resources: mounts and loop devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fcvm.core import proc


def _mount(data: dict[str, Any]) -> None:
    result = proc.run(["umount", "-l", data["path"]], check=False)
    if result.returncode not in (0, 32):  # 32: not mounted
        raise RuntimeError(result.stderr.decode(errors="replace").strip())


HANDLERS: dict[str, Callable[[dict[str, Any]], None]] = {"mount": _mount}
