"""Holes of a memory file, found with lseek(SEEK_DATA/SEEK_HOLE): one call per extent edge, no data read.

Most of a guest's memory is zeros, and a snapshot's memory file can be made sparse (`fallocate
--dig-holes`). The server answers faults inside holes with UFFDIO_ZEROPAGE, so every clone maps the
kernel's one shared zero page there instead of getting private zero-filled copies.

Reporting data where there is a hole is always correct (copying from the file yields its zeros); the
reverse would hand a VM zeros instead of its memory. So every doubt resolves to "data".
"""

from __future__ import annotations

import bisect
import errno
import os
from array import array
from collections.abc import Iterable

# lseek errors meaning "this filesystem or file cannot answer SEEK_DATA/SEEK_HOLE"
_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE)


class HoleMap:
    """The sorted, disjoint hole ranges [start, end) of one memory file of `size` bytes."""

    __slots__ = ("ends", "size", "starts")

    def __init__(self, size: int, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.size = size
        # two flat arrays rather than a list of tuples: a fragmented multi-GiB file has ~10^5 holes
        self.starts = array("q")
        self.ends = array("q")
        for start, end in ranges:
            self.starts.append(start)
            self.ends.append(end)

    @property
    def total(self) -> int:
        return sum(self.ends) - sum(self.starts)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends, strict=True))

    def page_runs(self, offset: int, length: int, page_size: int) -> list[tuple[int, int]]:
        """Page runs [lo, hi), as page indices from `offset`, of the file range [offset, offset + length)
        that lie entirely inside holes; a page only partly covered by a hole is data."""
        end = offset + length
        runs: list[tuple[int, int]] = []
        k = bisect.bisect_right(self.ends, offset)  # the first hole ending after `offset`
        while k < len(self.starts) and self.starts[k] < end:
            lo = -(-(max(self.starts[k], offset) - offset) // page_size)
            hi = (min(self.ends[k], end) - offset) // page_size
            if lo < hi:
                runs.append((lo, hi))
            k += 1
        return runs


def find(fd: int, size: int) -> HoleMap:
    """The holes of the first `size` bytes of the file open as `fd` (its file offset moves)."""
    holes: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size  # ENXIO: no data at or after `pos`
            if data > pos:
                holes.append((pos, min(data, size)))
            if data >= size:
                break
            pos = os.lseek(fd, data, os.SEEK_HOLE)  # every file ends in a (virtual) hole at EOF
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return HoleMap(size)
        raise
    return HoleMap(size, holes)
