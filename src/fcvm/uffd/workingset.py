"""Working sets (REAP, ASPLOS'21): the memory-file ranges the first client faulted, in fault order.

File format (little-endian): b"FCVMWS01", then u64 page size, u64 memory-file size, u64 memory-file
mtime (ns), u64 run count, then one (u64 offset, u64 length) per run. A working set recorded for a
different memory file (size or mtime differ) is ignored and recorded again.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from fcvm.core import log

_log = log.get("uffd")

MAGIC = b"FCVMWS01"
_HEADER = struct.Struct("<8sQQQQ")
_RUN = struct.Struct("<QQ")

Run = tuple[int, int]


def path_for_mem_file(mem_file: Path) -> Path:
    """Where the low-level form keeps the working set: next to the memory file."""
    return mem_file.with_name(mem_file.name + ".working-set")


class Recorder:
    """Collects demand-copied file ranges in order; adjacent ranges merge into one run."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.bytes = 0
        self.dirty = False

    def add(self, offset: int, length: int) -> None:
        self.bytes += length
        self.dirty = True
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == offset:
            self.runs[-1][1] += length
        else:
            self.runs.append([offset, length])

    def snapshot(self) -> list[Run]:
        return [(o, n) for o, n in self.runs]


def _identity(mem_file: Path) -> tuple[int, int]:
    st = mem_file.stat()
    return st.st_size, st.st_mtime_ns


def save(path: Path, mem_file: Path, runs: list[Run], page_size: int = 4096) -> None:
    size, mtime = _identity(mem_file)
    body = b"".join(_RUN.pack(o, n) for o, n in runs)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(_HEADER.pack(MAGIC, page_size, size, mtime, len(runs)) + body)
    os.replace(tmp, path)


def load(path: Path, mem_file: Path) -> list[Run] | None:
    """The runs, or None when there is no usable working set for this memory file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.warning("cannot read working set %s: %s", path, exc)
        return None
    try:
        return parse(data, *_identity(mem_file))
    except ValueError as exc:
        _log.warning("ignoring working set %s: %s", path, exc)
        return None


def parse(data: bytes, mem_size: int, mem_mtime_ns: int | None = None) -> list[Run]:
    if len(data) < _HEADER.size:
        raise ValueError("too short")
    magic, _page, size, mtime, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a working-set file")
    if size != mem_size or (mem_mtime_ns is not None and mtime != mem_mtime_ns):
        raise ValueError("recorded for a different memory file")
    if len(data) != _HEADER.size + count * _RUN.size:
        raise ValueError("truncated")
    runs: list[Run] = []
    for offset, length in _RUN.iter_unpack(data[_HEADER.size :]):
        if length == 0 or offset % 4096 or length % 4096 or offset + length > mem_size:
            raise ValueError(f"bad run {offset}+{length}")
        runs.append((offset, length))
    return runs


def total(runs: list[Run]) -> int:
    return sum(n for _, n in runs)
