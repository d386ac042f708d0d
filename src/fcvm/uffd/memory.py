"""Small libc wrappers for raw mappings: mmap/munmap/madvise with real addresses (ctypes)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26  # MAP_HUGETLB | log2(page size) << MAP_HUGE_SHIFT picks the huge page size
MADV_DONTNEED = 4
MADV_WILLNEED = 3
MADV_POPULATE_READ = 22
PROT_NONE = 0


def map_memory(
    length: int, prot: int, flags: int, fd: int = -1, offset: int = 0, addr: int | None = None
) -> int:
    """mmap(2); returns the address or raises OSError."""
    result = _libc.mmap(addr, length, prot, flags, fd, offset)
    if result is None or result == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes: {os.strerror(err)}")
    return int(result)


def unmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap: {os.strerror(err)}")


def advise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}): {os.strerror(err)}")


def map_file_readonly(fd: int, length: int) -> int:
    return map_memory(length, mmap.PROT_READ, mmap.MAP_SHARED, fd)
