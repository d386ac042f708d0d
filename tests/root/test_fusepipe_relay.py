"""What the guest relay answers itself: no round trip to the server, and the same answer the server gives.

The relay (`fcvm fuse-pipe mount`, as in a guest) talks to an in-process server whose requests are counted.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fcvm.fusepipe.fs import Filesystem
from fcvm_wire.fusepipe import proto
from tests.root.test_fusepipe_reconnect import ResettingProxy, setup  # noqa: F401 (a fixture)
from tests.support import eventually

CAPABILITY = "security.capability"
CAP_NET_RAW = struct.pack("<IIIII", 0x02000000, 1 << 13, 0, 0, 0)  # vfs_cap_data v2: cap_net_raw permitted


class Served:
    def __init__(self, src: Path, mnt: Path, requests: collections.Counter[tuple[str, int]]) -> None:
        self.src, self.mnt, self.requests = src, mnt, requests

    def seen(self, opcode: int, nodeid: int | None = None) -> int:
        name = proto.OPCODE_NAMES[opcode]
        return sum(n for (op, node), n in self.requests.items() if op == name and nodeid in (None, node))


@pytest.fixture
def served(setup: tuple[Path, Path, ResettingProxy], monkeypatch: pytest.MonkeyPatch) -> Served:  # noqa: F811
    """The reconnect tests' mount (in-process server, relay in `fcvm fuse-pipe mount`), its requests counted."""
    requests: collections.Counter[tuple[str, int]] = collections.Counter()
    dispatch = Filesystem.dispatch

    def counting(self: Filesystem, h: proto.InHeader, msg: bytes) -> bytes | None:
        requests[(proto.OPCODE_NAMES.get(h.opcode, str(h.opcode)), h.nodeid)] += 1
        return dispatch(self, h, msg)

    monkeypatch.setattr(Filesystem, "dispatch", counting)
    src, mnt, _ = setup
    return Served(src, mnt, requests)


def test_a_written_file_costs_no_capability_probe_or_flush_at_the_server(served: Served) -> None:
    path = served.mnt / "f"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, b"x" * 4096)
    os.fsync(fd)
    os.close(fd)
    assert (served.src / "f").read_bytes() == b"x" * 4096
    assert served.seen(proto.WRITE) == 1 and served.seen(proto.FSYNC) == 1
    assert served.seen(proto.GETXATTR) == 0  # the kernel's killpriv probe before the write
    assert served.seen(proto.FLUSH) == 0  # close(): no lock was ever taken on the file
    with pytest.raises(OSError) as exc:
        os.getxattr(path, "user.none")
    assert exc.value.errno == errno.ENODATA
    assert served.seen(proto.GETXATTR) == 1  # any other xattr still goes to the server


def _other_process_can_lock(path: Path) -> bool:
    code = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], timeout=30).returncode == 0


def test_closing_any_fd_still_drops_the_posix_locks_on_the_file(served: Served) -> None:
    (served.src / "locked").write_bytes(b"data")
    path = served.mnt / "locked"
    holder = os.open(path, os.O_RDWR)
    fcntl.lockf(holder, fcntl.LOCK_EX)
    other = os.open(path, os.O_RDWR)
    assert not _other_process_can_lock(path)
    (nodeid,) = {node for (op, node) in served.requests if op in ("SETLK", "SETLKW")}
    flushes = served.seen(proto.FLUSH, nodeid)
    os.close(other)  # POSIX: closing any fd of the file drops this process's locks on it
    assert served.seen(proto.FLUSH, nodeid) == flushes + 1  # after a lock request, the server hears every close
    assert _other_process_can_lock(path)
    os.close(holder)


def test_file_capabilities_are_hidden_from_the_guest_and_stripped_by_its_writes(served: Served) -> None:
    host = served.src / "tool"
    host.write_bytes(b"#!/bin/sh\n")
    os.chmod(host, 0o777)
    os.setxattr(host, CAPABILITY, CAP_NET_RAW)
    path = served.mnt / "tool"
    with pytest.raises(OSError) as exc:
        os.getxattr(path, CAPABILITY)
    assert exc.value.errno == errno.ENODATA
    assert CAPABILITY not in os.listxattr(path)
    assert served.seen(proto.GETXATTR) == 0
    with open(path, "ab") as f:
        f.write(b"exit 0\n")
    assert host.read_bytes() == b"#!/bin/sh\nexit 0\n"
    with pytest.raises(OSError) as exc:  # the host's kernel removed it, as for any unprivileged write
        os.getxattr(host, CAPABILITY)
    assert exc.value.errno == errno.ENODATA


@pytest.fixture
def hour_long_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's entry, attribute and negative timeouts (and so the relay's) are an hour: whatever the mount
    shows of a host-side change before then came by invalidation. Must come before `served`."""
    monkeypatch.setenv("FCVM_FUSEPIPE_TIMEOUT", "3600")


def test_creating_files_asks_the_server_nothing_about_their_directory(served: Served) -> None:
    # Made through the mount: one made on the host is announced by a notification about it, which may arrive
    # after the first create's hint and void it (as it must), so the counts below would depend on timing.
    os.mkdir(served.mnt / "d")
    for i in range(20):
        with open(served.mnt / "d" / f"f{i}", "wb") as f:
            f.write(b"x")
    ((_, d),) = {(op, node) for (op, node) in served.requests if op == "CREATE"}
    assert served.seen(proto.CREATE, d) == 20
    assert served.seen(proto.LOOKUP, d) == 1  # the first new name; its answer lists the directory for the relay
    assert served.seen(proto.GETATTR, d) == 0  # each CREATE's answer carries the directory's new attributes
    os.mkdir(served.mnt / "d" / "sub")
    os.unlink(served.mnt / "d" / "f0")
    seen = os.stat(served.mnt / "d")
    host = os.stat(served.src / "d")
    assert (seen.st_nlink, seen.st_mtime_ns, seen.st_ctime_ns) == (host.st_nlink, host.st_mtime_ns, host.st_ctime_ns)
    assert sorted(os.listdir(served.mnt / "d")) == sorted(os.listdir(served.src / "d"))


def test_names_the_host_creates_show_up_although_the_relay_answers_lookups(hour_long_caches: None,
                                                                          served: Served) -> None:
    os.mkdir(served.mnt / "d")  # (see above)
    d = served.mnt / "d"
    assert not (d / "a").exists()  # the server lists d for the relay
    lookups = served.seen(proto.LOOKUP)
    assert not (d / "b").exists()
    assert served.seen(proto.LOOKUP) == lookups  # the relay answered
    (served.src / "d" / "b").write_text("host")
    eventually(lambda: (d / "b").exists(), "a file the host created")
    assert (d / "b").read_text() == "host"
    os.mkdir(served.src / "d" / "sub")
    eventually(lambda: os.stat(d).st_nlink == 3, "the directory's new link count")
