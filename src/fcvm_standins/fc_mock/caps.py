"""The two Linux capabilities a jailed fc-mock keeps, and how they travel (shared by jailer.py and main.py).

Firecracker serves MMDS inside its own device model, so a jailed Firecracker needs no capability at all.
fc-mock emulates MMDS with host networking instead (mmds.py: an address on the TAP, a listener on port
80), which needs CAP_NET_ADMIN and CAP_NET_BIND_SERVICE. The jailer stand-in drops to the jail uid and
keeps exactly those two as *ambient* capabilities, the only kind that survives execve of a non-root,
non-setcap program. fc-mock then clears its ambient set at start: it keeps the two itself, but QEMU, which
it spawns, runs with none, so QEMU may open the TAP only as its owner, as a jailed Firecracker must.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
MMDS_CAPS = (CAP_NET_ADMIN, CAP_NET_BIND_SERVICE)

_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    # prctl is variadic: every argument goes as an unsigned long, unused ones as 0 (the kernel checks them).
    args = [ctypes.c_ulong(a) for a in (arg2, arg3, 0, 0)]
    if _libc.prctl(ctypes.c_int(option), *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}, {arg3}): {os.strerror(err)}")


def mask(caps: Iterable[int]) -> int:
    """The bit mask of `caps`, as /proc/<pid>/status shows capability sets."""
    bits = 0
    for cap in caps:
        bits |= 1 << cap
    return bits


def set_keepcaps(keep: bool) -> None:
    """PR_SET_KEEPCAPS: keep the permitted set when setresuid leaves uid 0 (execve resets the flag)."""
    _prctl(_PR_SET_KEEPCAPS, int(keep))


def keep_only(caps: Iterable[int]) -> None:
    """Make `caps` the permitted, effective, inheritable and ambient sets, so they survive execve.

    Needs them in the permitted set (root, or set_keepcaps(True) before dropping uid 0)."""
    wanted = list(caps)
    bits = mask(wanted)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: capabilities 0-31 in data[0], 32-63 in data[1]
    for i in range(2):
        word = (bits >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    for cap in wanted:  # raising an ambient capability needs it permitted and inheritable: set just above
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)


def clear_ambient() -> None:
    """Empty the ambient set: this process keeps its capabilities, the programs it execs get none."""
    try:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # kernels before 4.3 have no ambient set: nothing to clear
            raise
