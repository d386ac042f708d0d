"""A line log a guest fills, bounded on disk like podman's `log_size_max`.

The guest decides how much it prints (its console, its container's output), so the file cannot grow without
bound: once a line would take it past `max_bytes`, the file becomes `<name>.1` (replacing the previous one) and a
new one begins. At most twice `max_bytes` stay on disk.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

ROTATED_SUFFIX = ".1"
MAX_BYTES = 10 << 20


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ROTATED_SUFFIX)


def existing_files(path: Path) -> list[Path]:
    """The files of the log at `path` that exist, oldest first."""
    return [p for p in (rotated(path), path) if p.exists()]


class BoundedLog:
    """Appends whole lines (one write each, so a follower sees them at once); safe from several threads."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        # Owner-only from the start: what a guest prints may be secret.
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write_line(self, line: str) -> None:
        data = line.encode(errors="backslashreplace") + b"\n"
        with self._lock:
            if self._fd < 0:
                return
            if self._size and self._size + len(data) > self.max_bytes:
                os.close(self._fd)
                os.replace(self.path, rotated(self.path))
                self._fd = self._open()
                self._size = 0
            os.write(self._fd, data)
            self._size += len(data)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
