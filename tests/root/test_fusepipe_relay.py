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
import threading
import time
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
    """The reconnect tests' mount (in-process server, relay in `fcvm fuse-pipe mount`), the requests reaching its
    server counted."""
    requests: collections.Counter[tuple[str, int]] = collections.Counter()
    dispatch = Filesystem.dispatch

    def counting(self: Filesystem, h: proto.InHeader, msg: bytes) -> bytes | None:
        requests[(proto.OPCODE_NAMES.get(h.opcode, str(h.opcode)), h.nodeid)] += 1
        return dispatch(self, h, msg)

    fsync_target = Filesystem.fsync_target

    def counting_fsyncs(self: Filesystem, msg: bytes) -> tuple[int, bool] | None:
        target = fsync_target(self, msg)
        if target is not None:  # an FSYNC the session's sync groups take instead of dispatch
            h = proto.parse_in_header(msg)
            requests[(proto.OPCODE_NAMES[h.opcode], h.nodeid)] += 1
        return target

    monkeypatch.setattr(Filesystem, "dispatch", counting)
    monkeypatch.setattr(Filesystem, "fsync_target", counting_fsyncs)
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


def _host_writes(path: Path, data: bytes, mode: str = "wb") -> None:
    """Another process on the host writes `data` to `path`, opened with `mode` (the server runs in this one:
    its own writes are the guest's)."""
    subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], sys.argv[2]).write(sys.argv[3].encode())",
                    str(path), mode, data.decode()], check=True)


def test_a_small_file_comes_with_its_open_and_a_large_one_is_read(hour_long_caches: None, served: Served) -> None:
    small, large = os.urandom(5000), os.urandom((64 << 10) + 1)
    (served.src / "small").write_bytes(small)
    (served.src / "large").write_bytes(large)
    assert (served.mnt / "small").read_bytes() == small
    assert served.seen(proto.OPEN) == 1 and served.seen(proto.READ) == 0
    assert (served.mnt / "large").read_bytes() == large
    assert served.seen(proto.READ) > 0
    # What came with the open is the file as it was: a later host-side change still reaches the guest.
    _host_writes(served.src / "small", b"changed on the host")
    eventually(lambda: (served.mnt / "small").read_bytes() == b"changed on the host", "the host's new content")


def test_a_host_write_right_after_the_guests_own_still_shows(hour_long_caches: None, served: Served) -> None:
    """The server drops the events of its own writes (the guest's kernel made them); a host write queued right
    behind one, to the same file, must not be merged into it. The file stays open in the guest, so nothing but
    an invalidation can show the host's bytes (no content comes with a second open)."""
    (served.src / "f").write_bytes(b"initial")
    reader = os.open(served.mnt / "f", os.O_RDONLY)
    try:
        for round_ in range(5):
            writer = os.open(served.mnt / "f", os.O_WRONLY)
            os.pwrite(writer, b"guest %d" % round_, 0)
            os.close(writer)
            assert os.pread(reader, 64, 0) == b"guest %d" % round_
            _host_writes(served.src / "f", b"host! %d" % round_, "r+b")  # the same size: no size change shows it
            eventually(lambda: os.pread(reader, 64, 0) == b"host! %d" % round_,  # noqa: B023
                       "the host's write after the guest's")
    finally:
        os.close(reader)


def test_reads_racing_writes_through_the_mount_see_every_finished_write(served: Served) -> None:
    """Readers open, read and close small files while writers rewrite them through the mount: a read that starts
    after a write finished sees that write or a later one (content stored with an open must never be older), and
    nothing hangs (a store written while a READ or WRITE of the file is in flight would wait on its locked page
    forever)."""
    files, size, stop_at = 4, 4096, time.monotonic() + 3
    done = [0] * files  # the last version whose write returned, per file
    for i in range(files):
        (served.src / f"v{i}").write_bytes(b"%08d" % 0 * (size // 8))
    stale: list[str] = []

    def writer(i: int) -> None:
        version = 0
        while time.monotonic() < stop_at:
            version += 1
            fd = os.open(served.mnt / f"v{i}", os.O_WRONLY)
            os.pwrite(fd, b"%08d" % version * (size // 8), 0)
            os.close(fd)
            done[i] = version

    def reader(n: int) -> None:
        while time.monotonic() < stop_at:
            i = n % files
            floor = done[i]
            fd = os.open(served.mnt / f"v{i}", os.O_RDONLY)
            data = os.pread(fd, size, 0)
            os.close(fd)
            # A read racing a write may see part of each (as on any Linux filesystem): every part is the
            # finished version or a later one, never an earlier one.
            seen = min(int(data[k:k + 8]) for k in range(0, len(data), 8)) if len(data) == size else -1
            if seen < floor:
                stale.append(f"v{i}: read version {seen} after version {floor} was written")
            n += 1

    conn = os.minor(os.stat(served.mnt).st_dev)
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(files)]
    threads += [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        connections = Path("/sys/fs/fuse/connections")
        if not any(connections.iterdir()):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], check=True)
        (connections / str(conn) / "abort").write_text("1")  # free the stuck threads (and the relay)
        pytest.fail("readers or writers hung on the mount")
    assert not stale, stale[:3]
    assert min(done) > 10 and served.seen(proto.OPEN) > 100  # the race was run, not skipped
