"""Syscalls Python's os module lacks (or wraps process-wide), through ctypes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)

AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_SYSCALLS = {
    "x86_64": {"capget": 125, "capset": 126},
    "aarch64": {"capget": 90, "capset": 91},
}[platform.machine()]


def _check(res: int, what: str) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.syscall.restype = ctypes.c_long


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, old, newdirfd, new, flags), "renameat2")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def utimensat_empty(fd: int, atime: tuple[int, int], mtime: tuple[int, int], nofollow: bool) -> None:
    """utimensat(fd, "", times, AT_EMPTY_PATH): works on O_PATH fds, including symlinks."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    flags = AT_EMPTY_PATH | (AT_SYMLINK_NOFOLLOW if nofollow else 0)
    _check(_libc.utimensat(fd, b"", times, flags), "utimensat")


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
           "fchownat")


def link_empty(fd: int, newdirfd: int, name: bytes) -> None:
    """linkat(fd, "", newdir, name, AT_EMPTY_PATH); falls back to /proc/self/fd without CAP_DAC_READ_SEARCH."""
    if _libc.linkat(fd, b"", newdirfd, name, AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err != 1 and err != 2:  # EPERM / ENOENT: no capability for AT_EMPTY_PATH
        raise OSError(err, os.strerror(err))
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=newdirfd, follow_symlinks=True)


# --- per-thread credentials ---------------------------------------------------------------------------
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _raise_effective_caps() -> None:
    """After setfsuid(non-zero) the kernel drops the file capabilities from the thread's effective set;
    put them back (the guest kernel already checked permissions: default_permissions)."""
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_SYSCALLS["capget"], ctypes.byref(hdr), data), "capget")
    for d in data:
        d.effective = d.permitted
    _check(_libc.syscall(_SYSCALLS["capset"], ctypes.byref(hdr), data), "capset")


_CLONE_FS = 0x200


_fs_private = threading.local()


@contextlib.contextmanager
def exact_modes() -> Iterator[None]:
    """Create files with exactly the mode the guest sent: its kernel already applied the caller's umask, so
    the host's must not apply again. umask is shared by the threads of a process; unshare(CLONE_FS) makes it
    this thread's own, and it is restored afterwards, so the rest of the process (the VM supervisor, a test
    run) never sees umask 0."""
    if not getattr(_fs_private, "done", False):
        _check(_libc.unshare(_CLONE_FS), "unshare(CLONE_FS)")
        _fs_private.done = True
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


class Credentials:
    """Thread-local filesystem uid/gid. setfsuid/setfsgid act on the calling thread only (glibc does not
    broadcast them, unlike setuid/setgroups), so each worker thread carries the caller of its request."""

    def __init__(self) -> None:
        self.enabled = os.geteuid() == 0
        self._local = threading.local()

    def switch(self, uid: int, gid: int) -> None:
        if not self.enabled:
            return
        cur = getattr(self._local, "ids", (0, 0))
        if cur == (uid, gid):
            return
        _libc.setfsgid(gid)
        _libc.setfsuid(uid)
        if uid != 0:
            _raise_effective_caps()
        self._local.ids = (uid, gid)
