"""`container.log`: the container's output as the host keeps it, bounded like podman's `log_size_max`.

The guest decides how much its container prints, so the file cannot grow without bound: once a line would take
it past MAX_BYTES, it becomes `container.log.1` (replacing the previous one) and a new `container.log` begins. At
most twice MAX_BYTES stay on disk; `fcvm logs` reads the rotated file first.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CONTAINER_LOG = "container.log"
ROTATED_SUFFIX = ".1"
MAX_BYTES = 10 << 20


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ROTATED_SUFFIX)


def log_files(directory: Path) -> list[Path]:
    """The container's log files in `directory` that exist, oldest first."""
    current = directory / CONTAINER_LOG
    return [p for p in (rotated(current), current) if p.exists()]


class ContainerLog:
    """Appends whole lines (one write each, so `fcvm logs -f` sees them at once); safe from several threads."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        # Owner-only from the start: what a container prints may be secret.
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
