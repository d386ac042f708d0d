"""Shared test helpers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"


def eventually(check: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    """Poll `check` (an OSError counts as not yet) until it holds; fail, saying `what`, if it has not after a
    generous deadline (seconds) for something that should take milliseconds."""
    end = time.monotonic() + deadline
    while True:
        with contextlib.suppress(OSError):
            if check():
                return
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.02)


def require(condition: bool, reason: str) -> None:
    """Skip (printing why) when a prerequisite is missing; in CI a missing prerequisite is a failure,
    so the `root` and `vm` tiers can never pass by skipping."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_tool(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None, f"needs {name} on PATH")


_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_NO_ADDRESS = 0x2 | 0x200  # UNKNOWN, DATA_INLINE: fe_physical means nothing
_FIEMAP_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, pad
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, reserved, fe_flags, reserved
_EXTENTS_PER_CALL = 512


def physical_extents(path: Path) -> list[tuple[int, int]]:
    """The (physical offset, length) of each extent of `path`, from FIEMAP (after a sync of its dirty pages):
    two files share data exactly where their physical ranges overlap."""
    found: list[tuple[int, int]] = []
    start = 0
    with open(path, "rb") as file:
        while True:
            request = bytearray(_FIEMAP_HEADER.size + _FIEMAP_EXTENT.size * _EXTENTS_PER_CALL)
            _FIEMAP_HEADER.pack_into(request, 0, start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC, 0,
                                     _EXTENTS_PER_CALL, 0)
            fcntl.ioctl(file.fileno(), _FS_IOC_FIEMAP, request)
            mapped = _FIEMAP_HEADER.unpack_from(request, 0)[3]
            if mapped == 0:
                return found
            for index in range(mapped):
                logical, physical, length, flags = _FIEMAP_EXTENT.unpack_from(
                    request, _FIEMAP_HEADER.size + index * _FIEMAP_EXTENT.size)
                if not flags & _FIEMAP_EXTENT_NO_ADDRESS:
                    found.append((physical, length))
                if flags & _FIEMAP_EXTENT_LAST:
                    return found
            start = logical + length


def allocated_bytes(path: Path) -> int:
    return sum(length for _, length in physical_extents(path))


def shared_bytes(path: Path, other: Path) -> int:
    """How many bytes of `path`'s data are the very blocks of `other`'s (a reflink shares them; a copy none)."""
    theirs = sorted(physical_extents(other))
    shared = 0
    for start, length in physical_extents(path):
        end = start + length
        for other_start, other_length in theirs:
            if other_start >= end:
                break
            shared += max(0, min(end, other_start + other_length) - max(start, other_start))
    return shared


_FAKE_OWNER = """
import signal, sys, time
from fcvm.core.proc import ProcessRef
from fcvm.state import Store
from fcvm.state.journal import Journal
name, marker, ignore_sigterm = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
store = Store()
vm = store.create_vm(name, process=ProcessRef.self(), image="localhost/x")
store.allocate("subnet", vm.id, ["10"])
Journal(store, vm.id).record("file", path=marker)
store.update_vm(vm.id, status="running")
print("ready", flush=True)
time.sleep(600)
"""


def fake_owner(name: str, marker: Path, *, ignore_sigterm: bool = False) -> subprocess.Popen[bytes]:
    """A process that owns a running VM row the way a supervisor does: a subnet allocation and a journaled
    `marker` file (removed when its journal is replayed). Returns once the row is running."""
    owner = subprocess.Popen([sys.executable, "-c", _FAKE_OWNER, name, str(marker), "1" if ignore_sigterm else "0"],
                             stdout=subprocess.PIPE)
    assert owner.stdout is not None and owner.stdout.readline() == b"ready\n"
    return owner


NOBODY = 65534


def as_other_user(action: Callable[[], object], uid: int = NOBODY) -> str:
    """Run `action` in a forked child as `uid` (gid the same, no groups): another local user attacking.
    Returns "ok: <its result>", or "<OSError subclass>: <strerror>" when it raised one."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                outcome = f"ok: {action()!r}"
            except OSError as exc:
                outcome = f"{type(exc).__name__}: {exc.strerror}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome
