"""fuse-pipe invalidation: host-side name changes are forwarded, the server's own are not (no kernel mount)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
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


def _write_elsewhere(path: Path) -> None:
    """Append to `path` from another process (a host-side writer)."""
    subprocess.run(["sh", "-c", 'printf data >> "$0"', str(path)], check=True)


def _known_file(root: Path, table: InodeTable, hub: inval.InotifyHub, sent: list[bytes]) -> int:
    """A file `f` in `root` the session knows (as after a LOOKUP); its node id. Pending events are read."""
    (root / "f").write_bytes(b"")
    st = os.stat(root / "f")
    hub.read_once()
    sent.clear()
    return table.add(os.open(root / "f", os.O_PATH | os.O_CLOEXEC), st).nodeid


def _content_invals(sent: list[bytes]) -> list[int]:
    """Node ids of the data invalidations sent (and clears `sent`)."""
    nodeids = [nodeid for nodeid, offset, _ in
               (proto.NOTIFY_INVAL_INODE_OUT.unpack_from(m, proto.OUT_HEADER.size) for m in _split(sent)
                if proto.OUT_HEADER.unpack_from(m)[1] == proto.NOTIFY_INVAL_INODE) if offset == 0]
    sent.clear()
    return nodeids


def test_another_process_writing_a_file_invalidates_it(watched: tuple) -> None:
    root, table, hub, _, sent = watched
    nodeid = _known_file(root, table, hub, sent)
    _write_elsewhere(root / "f")
    hub.read_once()
    assert _content_invals(sent) == [nodeid]


def test_the_servers_own_writes_are_not_forwarded_but_never_hide_a_host_write(watched: tuple) -> None:
    root, table, hub, _, sent = watched
    assert hub.content is not None, "fanotify is needed on this host (Linux 5.9+)"
    nodeid = _known_file(root, table, hub, sent)
    with open(root / "f", "ab") as f:  # as the server writes a guest's WRITE
        f.write(b"own")
    hub.read_once()
    assert _content_invals(sent) == []
    # A host write right after one of ours, both still queued: inotify would merge the two events into one;
    # fanotify keeps them apart, and the host's is forwarded.
    with open(root / "f", "ab") as f:
        f.write(b"own")
    _write_elsewhere(root / "f")
    hub.read_once()
    assert _content_invals(sent) == [nodeid]


@contextlib.contextmanager
def _sessions(root: Path, *hubs: inval.InotifyHub) -> Iterator[tuple[list[InodeTable], list[list[bytes]],
                                                                       list[inval.Invalidator]]]:
    """One session on `root` per hub given (a hub twice: two sessions of one server): their tables, what each
    was sent, their invalidators; all closed afterwards."""
    tables = [InodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for _ in hubs]
    sent: list[list[bytes]] = [[] for _ in hubs]
    invs = [inval.Invalidator(h, t, s.append, lambda: True) for h, t, s in zip(hubs, tables, sent, strict=True)]
    try:
        yield tables, sent, invs
    finally:
        for inv in invs:
            inv.close()
        for t in tables:
            t.close()


@pytest.fixture
def other_hub() -> Iterator[inval.InotifyHub]:
    """A second server's hub in this process."""
    h = inval.InotifyHub()
    yield h
    h.close()


def test_own_writes_are_forwarded_when_another_session_watches_the_directory(
        tmp_path: Path, hub: inval.InotifyHub, other_hub: inval.InotifyHub) -> None:
    """Another session of this server, or of a second server in this process (two overlapping --map volumes):
    this process's write may have been the other session's, so both are told."""
    with _sessions(tmp_path, hub, hub, other_hub) as (tables, sent, invs):
        (tmp_path / "f").write_bytes(b"")
        st = os.stat(tmp_path / "f")
        nodeids = [t.add(os.open(tmp_path / "f", os.O_PATH | os.O_CLOEXEC), st).nodeid for t in tables]
        for h in (hub, other_hub):
            h.read_once()
        for s in sent:
            s.clear()
        invs[1].close()  # one session of each server left on the directory
        with open(tmp_path / "f", "ab") as f:
            f.write(b"own")
        for h in (hub, other_hub):
            h.read_once()
        assert [_content_invals(s) for s in sent] == [[nodeids[0]], [], [nodeids[2]]]
        invs[2].close()  # now the first session alone watches it: its own write is its own
        with open(tmp_path / "f", "ab") as f:
            f.write(b"own")
        hub.read_once()
        assert _content_invals(sent[0]) == []


def test_own_writes_are_forwarded_when_a_server_without_fanotify_watches_too(
        tmp_path: Path, hub: inval.InotifyHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second server in this process whose hub has no fanotify (the user's fanotify groups ran out): its
    guest's writes are this process's too, so this hub cannot call them its own session's."""
    with monkeypatch.context() as m:
        m.setattr(inval.sysc, "fanotify_init", _no_fanotify)
        other_hub = inval.InotifyHub()
    try:
        with _sessions(tmp_path, hub, other_hub) as (tables, sent, _):
            assert hub.content is not None and other_hub.content is None
            nodeid = _known_file(tmp_path, tables[0], hub, sent[0])
            with open(tmp_path / "f", "ab") as f:  # the other server's guest writing, as far as anyone can tell
                f.write(b"theirs")
            hub.read_once()
            assert _content_invals(sent[0]) == [nodeid]
    finally:
        other_hub.close()


def test_a_directory_fanotify_cannot_mark_is_watched_for_writes_by_inotify(
        watched: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without file handles (or the marks limit reached): IN_MODIFY, forwarded whoever wrote."""
    root, table, hub, _, sent = watched

    def no_handles(fd: int) -> bytes:
        raise OSError(errno.EOPNOTSUPP, "name_to_handle_at: Operation not supported")
    monkeypatch.setattr(inval.sysc, "file_handle", no_handles)
    (root / "sub").mkdir()
    st = os.stat(root / "sub")
    sub = table.add(os.open(root / "sub", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), st)  # watched as it comes
    assert hub.content is not None and sub.wd >= 0 and sub.wd not in hub.content.handles
    (sub_file := root / "sub" / "f").write_bytes(b"")
    fst = os.stat(sub_file)
    hub.read_once()
    sent.clear()
    nodeid = table.add(os.open(sub_file, os.O_PATH | os.O_CLOEXEC), fst).nodeid
    with open(sub_file, "ab") as f:  # the server's own: inotify cannot tell, so it is forwarded
        f.write(b"own")
    hub.read_once()
    assert _content_invals(sent) == [nodeid]


def _no_fanotify() -> int:
    raise OSError(errno.EPERM, "fanotify_init: Operation not permitted")


def test_without_fanotify_every_write_is_forwarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inval.sysc, "fanotify_init", _no_fanotify)
    hub = inval.InotifyHub()
    try:
        with _sessions(tmp_path, hub) as ((table,), (sent,), _):
            assert hub.content is None
            nodeid = _known_file(tmp_path, table, hub, sent)
            with open(tmp_path / "f", "ab") as f:  # the server's own: inotify cannot tell, so it is forwarded
                f.write(b"own")
            hub.read_once()
            assert _content_invals(sent) == [nodeid]
    finally:
        hub.close()


def test_sessions_share_the_inotify_instance_and_see_each_others_changes(tmp_path: Path,
                                                                         hub: inval.InotifyHub) -> None:
    with _sessions(tmp_path, hub, hub) as (tables, sent, (first, _)):
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
    assert not hub.watchers
