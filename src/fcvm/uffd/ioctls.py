"""userfaultfd(2) ioctls, hand-written (x86_64 / aarch64 share these numbers).

Only what the page server and the harness need: create a uffd, UFFDIO_API, REGISTER/UNREGISTER,
COPY, ZEROPAGE, WAKE, and decoding of 32-byte `uffd_msg` records. Calls go through `fcntl.ioctl` with a
mutable buffer, which releases the GIL for the duration of the ioctl and copies the kernel's answer
back even when the ioctl fails (so `copy` is known after a partial UFFDIO_COPY).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

# <linux/userfaultfd.h>
UFFD_API = 0xAA
UFFD_FEATURE_EVENT_REMOVE = 1 << 3

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)          24 bytes
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register) 32 bytes
UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)    16 bytes
UFFDIO_WAKE = 0x8010AA02  # _IOR(0xAA, 0x02, struct uffdio_range)
UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)         40 bytes
UFFDIO_ZEROPAGE = 0xC020AA04  # _IOWR(0xAA, 0x04, struct uffdio_zeropage) 32 bytes
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00) on /dev/userfaultfd

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
MSG_SIZE = 32

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

_API = struct.Struct("=QQQ")
_RANGE = struct.Struct("=QQ")
_REGISTER = struct.Struct("=QQQQ")
_COPY = struct.Struct("=QQQQq")
_ZEROPAGE = struct.Struct("=QQQq")
# uffd_msg: u8 event, u8, u16, u32, then a 24-byte union (pagefault: flags, address, ptid; remove: start, end)
MSG = struct.Struct("=B7xQQQ")


class UffdError(OSError):
    """An ioctl failed; `done` is how many bytes were filled before the failure (COPY/ZEROPAGE)."""

    def __init__(self, err: int, what: str, done: int = 0) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.done = done


def create(*, nonblock: bool = True) -> int:
    """A new userfaultfd: /dev/userfaultfd (USERFAULTFD_IOC_NEW) first, then the syscall."""
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        dev = -1
    if dev >= 0:
        try:
            return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        except OSError:
            pass
        finally:
            os.close(dev)
    number = _SYS_USERFAULTFD.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, "userfaultfd: unsupported architecture")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = int(libc.syscall(number, flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)} (try root or vm.unprivileged_userfaultfd=1)")
    return fd


def api(fd: int, features: int = UFFD_FEATURE_EVENT_REMOVE) -> tuple[int, int]:
    """UFFDIO_API handshake; returns (features granted, ioctls bitmask)."""
    buf = bytearray(_API.pack(UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_API, buf, True)
    except OSError as exc:
        raise UffdError(exc.errno or errno.EINVAL, "UFFDIO_API") from None
    _, granted, ioctls = _API.unpack(buf)
    return granted, ioctls


def register(fd: int, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
    """UFFDIO_REGISTER; returns the ioctls bitmask available on the range."""
    buf = bytearray(_REGISTER.pack(start, length, mode, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_REGISTER, buf, True)
    except OSError as exc:
        raise UffdError(exc.errno or errno.EINVAL, "UFFDIO_REGISTER") from None
    return _REGISTER.unpack(buf)[3]


def unregister(fd: int, start: int, length: int) -> None:
    try:
        fcntl.ioctl(fd, UFFDIO_UNREGISTER, _RANGE.pack(start, length))
    except OSError as exc:
        raise UffdError(exc.errno or errno.EINVAL, "UFFDIO_UNREGISTER") from None


def wake(fd: int, start: int, length: int) -> None:
    try:
        fcntl.ioctl(fd, UFFDIO_WAKE, _RANGE.pack(start, length))
    except OSError as exc:
        raise UffdError(exc.errno or errno.EINVAL, "UFFDIO_WAKE") from None


class Copier:
    """UFFDIO_COPY / UFFDIO_ZEROPAGE with preallocated buffers (one per thread: not thread-safe).

    `copy` and `zeropage` return the number of bytes filled. They raise UffdError with `.done` set:
    EEXIST (first page already present), EAGAIN (partial, or a REMOVE/unmap is pending), ESRCH (the
    address space is gone), ENOENT/EINVAL/EFAULT (bad range).
    """

    __slots__ = ("_copy", "_zero")

    def __init__(self) -> None:
        self._copy = bytearray(_COPY.size)
        self._zero = bytearray(_ZEROPAGE.size)

    def copy(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        _COPY.pack_into(self._copy, 0, dst, src, length, mode, 0)
        _fill(fd, UFFDIO_COPY, "UFFDIO_COPY", self._copy, _COPY)
        return length

    def zeropage(self, fd: int, dst: int, length: int, mode: int = 0) -> int:
        _ZEROPAGE.pack_into(self._zero, 0, dst, length, mode, 0)
        _fill(fd, UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", self._zero, _ZEROPAGE)
        return length


def _fill(fd: int, request: int, name: str, buf: bytearray, layout: struct.Struct) -> None:
    """Run a COPY or ZEROPAGE ioctl on `buf`; on failure the kernel has stored in the struct's last field how many
    bytes it filled (or a negative error), which UffdError carries."""
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as exc:
        done = layout.unpack_from(buf)[-1]
        raise UffdError(exc.errno or errno.EIO, name, max(done, 0)) from None


@dataclass(frozen=True)
class Event:
    kind: int
    a: int  # PAGEFAULT: flags; REMOVE: start
    b: int  # PAGEFAULT: address; REMOVE: end


def parse_events(data: bytes) -> list[Event]:
    """Decode whole 32-byte records; a trailing partial record (never produced by the kernel) is ignored."""
    usable = len(data) - len(data) % MSG_SIZE
    return [Event(kind, a, b) for kind, a, b, _ in MSG.iter_unpack(data[:usable])]


def is_userfaultfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False
