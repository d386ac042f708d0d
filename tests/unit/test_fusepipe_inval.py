"""fuse-pipe invalidation: host-side name changes are forwarded, the server's own are not (no kernel mount)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.fusepipe import inval
from fcvm.fusepipe.inodes import InodeTable
from fcvm_wire.fusepipe import proto


@pytest.fixture
def hub() -> Iterator[inval.InotifyHub]:
    """Events are read only when the test calls `read_once()` (the hub's thread is not started)."""
    h = inval.InotifyHub()
    yield h
    h.close()


@pytest.fixture
def watched(tmp_path: Path, hub: inval.InotifyHub) -> Iterator[tuple[Path, InodeTable, inval.InotifyHub,
                                                                       inval.Invalidator, list[bytes]]]:
    table = InodeTable(os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    sent: list[bytes] = []
    inv = inval.Invalidator(hub, table, sent.append, lambda: True)
    yield tmp_path, table, hub, inv, sent
    inv.close()
    table.close()


def _split(sent: list[bytes]) -> list[bytes]:
    """The notifications in what was sent (one send may carry several)."""
    msgs: list[bytes] = []
    for data in sent:
        frames, used = proto.split_frames(data, proto.MIN_REPLY)
        assert used == len(data)
        msgs += frames
    return msgs


def _entries(sent: list[bytes]) -> list[bytes]:
    """Names of the FUSE_NOTIFY_INVAL_ENTRY messages sent (and clears `sent`)."""
    names = []
    for msg in _split(sent):
        _, code, unique = proto.OUT_HEADER.unpack_from(msg)
        assert unique == 0
        if code == proto.NOTIFY_INVAL_ENTRY:
            _, namelen, _ = proto.NOTIFY_INVAL_ENTRY_OUT.unpack_from(msg, proto.OUT_HEADER.size)
            start = proto.OUT_HEADER.size + proto.NOTIFY_INVAL_ENTRY_OUT.size
            names.append(msg[start:start + namelen])
    sent.clear()
    return names


def test_own_name_changes_are_not_forwarded_host_ones_are(watched: tuple) -> None:
    root, table, hub, inv, sent = watched
    e = inv.expect(table.root, b"own", inval.IN_CREATE)  # as the server does around a guest's MKDIR
    os.mkdir(root / "own")
    inv.done(e, True)
    os.mkdir(root / "host")
    e = inv.expect(table.root, b"f", inval.IN_CREATE)
    os.close(os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o644))
    inv.done(e, True)
    e1, e2 = inv.expect(table.root, b"f", inval.IN_MOVED_FROM), inv.expect(table.root, b"g", inval.IN_MOVED_TO)
    os.rename(root / "f", root / "g")
    inv.done(e1, True)
    inv.done(e2, True)
    os.unlink(root / "g")  # by the host: forwarded
    hub.read_once()
    assert _entries(sent) == [b"host", b"g"]
    assert not inv.expected


def test_an_event_read_while_the_syscall_runs_is_still_recognised(watched: tuple) -> None:
    root, table, hub, inv, sent = watched
    e = inv.expect(table.root, b"d", inval.IN_CREATE)
    os.mkdir(root / "d")
    hub.read_once()  # the inotify thread got there first
    inv.done(e, True)
    assert _entries(sent) == []
    assert not inv.expected


def test_a_failed_operation_forwards_the_event_it_held_back(watched: tuple) -> None:
    root, table, hub, inv, sent = watched
    e = inv.expect(table.root, b"d", inval.IN_CREATE)
    os.mkdir(root / "d")  # the host won the race: the guest's mkdir fails with EEXIST
    hub.read_once()
    assert _entries(sent) == []
    inv.done(e, False)
    assert _entries(sent) == [b"d"]
    assert not inv.expected


def test_an_expectation_never_swallows_a_later_host_change(watched: tuple) -> None:
    root, table, hub, inv, sent = watched
    (root / "f").write_bytes(b"")
    hub.read_once()
    sent.clear()
    # The guest "created" f, but it existed already: no event of its own. An unrelated event is queued.
    os.mkdir(root / "other")
    e = inv.expect(table.root, b"f", inval.IN_CREATE)
    os.close(os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o644))
    inv.done(e, True)
    hub.read_once()
    assert _entries(sent) == [b"other"]
    assert not inv.expected  # its window has been read
    # Nothing queued at all: nothing to expect.
    e = inv.expect(table.root, b"f", inval.IN_CREATE)
    os.close(os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o644))
    inv.done(e, True)
    assert not inv.expected
    os.unlink(root / "f")
    (root / "f").write_bytes(b"new")
    hub.read_once()
    assert _entries(sent) == [b"f"]  # delete + create by the host, coalesced within one read


def test_content_changes_are_always_forwarded(watched: tuple) -> None:
    root, table, hub, _, sent = watched
    fd = os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    st = os.fstat(fd)
    assert stat.S_ISREG(st.st_mode)
    hub.read_once()
    sent.clear()
    table.add(os.open(root / "f", os.O_PATH | os.O_CLOEXEC), st)
    os.write(fd, b"data")
    os.close(fd)
    hub.read_once()
    inodes = [proto.NOTIFY_INVAL_INODE_OUT.unpack_from(m, proto.OUT_HEADER.size) for m in _split(sent)
              if proto.OUT_HEADER.unpack_from(m)[1] == proto.NOTIFY_INVAL_INODE]
    assert (table.lookup_key((st.st_dev, st.st_ino)).nodeid, 0, 0) in inodes  # type: ignore[union-attr]


def test_sessions_share_the_inotify_instance_and_see_each_others_changes(tmp_path: Path,
                                                                         hub: inval.InotifyHub) -> None:
    tables = [InodeTable(os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for _ in range(2)]
    sent: list[list[bytes]] = [[], []]
    first, second = (inval.Invalidator(hub, t, s.append, lambda: True) for t, s in zip(tables, sent, strict=True))
    try:
        assert len(hub.watchers) == 1  # one directory, one watch, two sessions on it
        e = first.expect(tables[0].root, b"mine", inval.IN_CREATE)  # the first session's own mkdir
        os.mkdir(tmp_path / "mine")
        first.done(e, True)
        hub.read_once()
        assert (_entries(sent[0]), _entries(sent[1])) == ([], [b"mine"])  # news to the second session only
        first.close()  # the first session goes; the second still watches
        os.mkdir(tmp_path / "host")
        hub.read_once()
        assert (_entries(sent[0]), _entries(sent[1])) == ([], [b"host"])
    finally:
        second.close()
        for t in tables:
            t.close()
    assert not hub.watchers
