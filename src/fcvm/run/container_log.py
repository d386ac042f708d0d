"""`container.log`: the container's output as the host keeps it, a BoundedLog (`core/bounded_log.py`): at most
twice MAX_BYTES on disk, `container.log.1` the older half; `fcvm logs` reads the rotated file first.
"""

from __future__ import annotations

from pathlib import Path

from fcvm.core.bounded_log import existing_files

CONTAINER_LOG = "container.log"


def log_files(directory: Path) -> list[Path]:
    """The container's log files in `directory` that exist, oldest first."""
    return existing_files(directory / CONTAINER_LOG)
