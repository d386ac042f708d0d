"""Syscalls Python's os module lacks (or wraps process-wide), through ctypes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
import threading
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)

AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_SYNC_FILE_RANGE_WRITE = 2

_SYSCALLS = {
    "x86_64": {"capget": 125, "capset": 126, "setgroups": 116, "getdents64": 217, "io_setup": 206,
               "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"capget": 90, "capset": 91, "setgroups": 159, "getdents64": 61, "io_setup": 0, "io_destroy": 1,
                "io_submit": 2, "io_getevents": 4},
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
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.syscall.restype = ctypes.c_long


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, old, newdirfd, new, flags), "renameat2")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def start_writeback(fd: int) -> None:
    """Start writing `fd`'s dirty pages to its disk, without waiting (sync_file_range SYNC_FILE_RANGE_WRITE).

    Only a head start for an fsync(2) that follows and reports any error, so a failure here is ignored."""
    _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def fsync_errno(fd: int, datasync: bool) -> int:
    """fsync(2) (or fdatasync(2)) of `fd`; its errno, 0 if synced."""
    try:
        (os.fdatasync if datasync else os.fsync)(fd)
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


class _Iocb(ctypes.Structure):  # struct iocb (linux/aio_abi.h), little-endian
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16),
                ("aio_fildes", ctypes.c_uint32), ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64), ("aio_flags", ctypes.c_uint32),
                ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


_IOCB_CMD_FSYNC = 2
_IOCB_CMD_FDSYNC = 3


class FsyncBatch:
    """fsync(2) of many fds at once through one Linux AIO context (IOCB_CMD_FSYNC): the kernel's workers enter
    every fsync within microseconds of each other, so all of them wait for the same journal commit and its disk
    flush; an fsync entering after that commit has flushed issues a flush of its own (ext4_sync_file).

    io_destroy waits for an RCU grace period (33 ms here): keep a batch for many uses."""

    def __init__(self, slots: int = 64) -> None:
        self.slots = slots
        ctx = ctypes.c_ulong(0)
        _check(_libc.syscall(_SYSCALLS["io_setup"], ctypes.c_uint(slots), ctypes.byref(ctx)), "io_setup")
        self._ctx = ctx

    def fsync(self, fds: list[tuple[int, bool]]) -> list[int]:
        """fsync (or fdatasync, when the flag is set) each fd; the errno of each (0: synced), in order.
        One caller at a time."""
        errors: list[int] = []
        for start in range(0, len(fds), self.slots):
            errors += self._fsync_chunk(fds[start:start + self.slots])
        return errors

    def _fsync_chunk(self, fds: list[tuple[int, bool]]) -> list[int]:
        count = len(fds)
        iocbs = (_Iocb * count)()
        pointers = (ctypes.POINTER(_Iocb) * count)()
        for i, (fd, datasync) in enumerate(fds):
            iocbs[i].aio_data = i
            iocbs[i].aio_fildes = fd
            iocbs[i].aio_lio_opcode = _IOCB_CMD_FDSYNC if datasync else _IOCB_CMD_FSYNC
            pointers[i] = ctypes.pointer(iocbs[i])
        errors = [0] * count
        submitted = _libc.syscall(_SYSCALLS["io_submit"], self._ctx, ctypes.c_long(count), pointers)
        if submitted < 0:
            submitted = 0
        for i in range(submitted, count):  # refused (e.g. a file without fsync): as fsync(2) answers it
            errors[i] = fsync_errno(*fds[i])
        events = (_IoEvent * max(submitted, 1))()
        reaped = 0
        while reaped < submitted:
            n = _libc.syscall(_SYSCALLS["io_getevents"], self._ctx, ctypes.c_long(1),
                              ctypes.c_long(submitted - reaped), events, None)
            if n < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                _check(n, "io_getevents")
            for event in events[:n]:
                errors[event.data] = -event.res if event.res < 0 else 0
            reaped += n
        return errors

    def close(self) -> None:
        _libc.syscall(_SYSCALLS["io_destroy"], self._ctx)


_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                    ctypes.c_int]
_FAN_CLOEXEC = 0x1
_FAN_NONBLOCK = 0x2
_FAN_REPORT_DFID_NAME = 0x400 | 0x800  # FAN_REPORT_DIR_FID | FAN_REPORT_NAME
_FAN_MARK_ADD = 0x1
_FAN_MARK_REMOVE = 0x2
_AT_HANDLE_FID = 0x200  # name_to_handle_at: a handle to compare, not to open (what fanotify reports; Linux 6.5+)
_MAX_HANDLE_SZ = 128


def fanotify_init() -> int:
    """A fanotify group whose events name the directory (by file handle) and the child they happened to."""
    return _check(_libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_REPORT_DFID_NAME, os.O_RDONLY),
                  "fanotify_init")


def fanotify_mark(group: int, add: bool, mask: int, path: bytes) -> None:
    _check(_libc.fanotify_mark(group, _FAN_MARK_ADD if add else _FAN_MARK_REMOVE, mask, -100, path),  # AT_FDCWD
           "fanotify_mark")


def file_handle(fd: int) -> bytes:
    """The file handle of `fd` (O_PATH will do) as fanotify reports it: struct file_handle, header included."""
    buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)
    struct.pack_into("<I", buf, 0, _MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH | _AT_HANDLE_FID) < 0:
        if ctypes.get_errno() != errno.EINVAL:
            _check(-1, "name_to_handle_at")
        # A kernel before AT_HANDLE_FID: the same handle for every filesystem that can encode one.
        _check(_libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH), "name_to_handle_at")
    (size,) = struct.unpack_from("<I", buf, 0)
    return buf.raw[:8 + size]


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


_DIRENT64 = struct.Struct("<QqHB")  # linux_dirent64: d_ino d_off d_reclen d_type, then the name (NUL-terminated)
DIRENT64_MAX = _DIRENT64.size + 256  # the largest record: a 255-byte name, its NUL and padding fit


def getdents(fd: int, size: int) -> list[tuple[int, int, int, bytes]]:
    """The directory entries from `fd`'s position on, at most `size` bytes of them (at least one entry fits in
    DIRENT64_MAX): (inode, offset of the next entry, DT_* type, name). Empty at the end of the directory.
    The offsets are the filesystem's own cookies: lseek(fd, offset) resumes after that entry."""
    buf = ctypes.create_string_buffer(size)
    n = _check(_libc.syscall(_SYSCALLS["getdents64"], fd, buf, ctypes.c_size_t(size)), "getdents64")
    raw = buf.raw
    entries = []
    pos = 0
    while pos < n:
        ino, next_offset, reclen, dtype = _DIRENT64.unpack_from(raw, pos)
        name_start = pos + _DIRENT64.size
        entries.append((ino, next_offset, dtype, raw[name_start:raw.index(b"\0", name_start)]))
        pos += reclen
    return entries


# --- per-thread credentials ---------------------------------------------------------------------------
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _set_effective_caps(raised: bool) -> None:
    """Raise the calling thread's effective capabilities to its permitted set, or clear them all. The raw
    capset syscall acts on this thread only; the permitted set is kept, so the thread can switch again."""
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_SYSCALLS["capget"], ctypes.byref(hdr), data), "capget")
    for d in data:
        d.effective = d.permitted if raised else 0
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


_thread_ids = threading.local()  # per thread: the (uid, gid) it acts as, once it has dropped its capabilities
_NO_ID = 0xFFFFFFFF  # setfsuid/setfsgid(-1) change nothing and return the current id


def act_as(uid: int, gid: int) -> None:
    """Make the calling thread act on files as `uid`:`gid` with no supplementary groups and no capabilities.

    setfsuid/setfsgid and the raw setgroups and capset syscalls act on the calling thread only (glibc
    broadcasts setuid/setgroups to every thread, not these), so each worker thread carries the caller of
    its request. The permitted capability set is kept (to switch again later); the effective set is empty
    whenever a request runs, so the kernel applies plain DAC checks for `uid`, even for uid 0. A thread
    that cannot switch (the server does not run as root) acts as the server's own user.

    Raises PermissionError if the kernel did not take the ids (e.g. uid 0xFFFFFFFF)."""
    if getattr(_thread_ids, "ids", None) == (uid, gid):
        return
    if os.geteuid() != 0:
        _thread_ids.ids = (uid, gid)
        return
    _set_effective_caps(raised=True)
    _check(_libc.syscall(_SYSCALLS["setgroups"], 0, None), "setgroups")
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    # setfsuid(0) gives back the file capabilities in the permitted set: clear them after it.
    _set_effective_caps(raised=False)
    if _libc.setfsuid(_NO_ID) != uid or _libc.setfsgid(_NO_ID) != gid:
        _thread_ids.ids = None
        raise PermissionError(errno.EPERM, f"cannot act as {uid}:{gid}")
    _thread_ids.ids = (uid, gid)
