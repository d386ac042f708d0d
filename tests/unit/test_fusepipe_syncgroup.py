"""Group commit of a session's fsyncs (fcvm.fusepipe.syncgroup): who waits, who does not, what each gets, and the
AIO batch that syncs a group (fcvm.fusepipe.sysc.FsyncBatch)."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fcvm.fusepipe import syncgroup, sysc
from fcvm.fusepipe.syncgroup import SyncGroups

pytestmark = pytest.mark.unit

_LONG_HOLD = 2.0  # far longer than any wait below: a request that was held cannot finish in time


class _Disk:
    """Stands in for the host's fsync(2), fdatasync(2), writeback and AIO batches, recording what reached them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.failing: set[int] = set()

    def record(self, what: str, fd: int) -> int:
        with self.lock:
            self.calls.append((what, fd))
        return errno.EIO if what != "writeback" and fd in self.failing else 0

    def recorder(self, what: str) -> Callable[[int], None]:
        def call(fd: int) -> None:
            if self.record(what, fd):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return call

    def batch(self, slots: int = 64) -> object:
        disk = self

        class Batch:
            def fsync(self, fds: list[tuple[int, bool]]) -> list[int]:
                return [disk.record("batch fdatasync" if datasync else "batch fsync", fd) for fd, datasync in fds]

            def close(self) -> None:
                pass

        return Batch()


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Disk]:
    fake = _Disk()
    monkeypatch.setattr(sysc.os, "fsync", fake.recorder("fsync"))
    monkeypatch.setattr(sysc.os, "fdatasync", fake.recorder("fdatasync"))
    monkeypatch.setattr(syncgroup.sysc, "start_writeback", fake.recorder("writeback"))
    monkeypatch.setattr(syncgroup.sysc, "FsyncBatch", fake.batch)
    yield fake


class _Results:
    """What `synced` was given: one list per call, each fsync by its token (here: the fd)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int]]] = []
        self.cond = threading.Condition()

    def synced(self, results: list[tuple[int, int]]) -> None:
        with self.cond:
            self.calls.append(results)
            self.cond.notify_all()

    def errors(self) -> dict[int, int]:
        with self.cond:
            return {fd: error for call in self.calls for fd, error in call}

    def wait_for(self, fds: set[int], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: fds <= {fd for call in self.calls for fd, _ in call}, timeout)


def _groups(results: _Results, **kwargs: float) -> SyncGroups[int]:
    def run(work: Callable[[], None]) -> None:
        threading.Thread(target=work, daemon=True).start()
    return SyncGroups(run, results.synced, **kwargs)


def _after_a_lone_fsync(results: _Results, hold: float) -> SyncGroups[int]:
    """Groups in which fd 3 (guest thread 100) has just been synced alone, so that the next fsync from another
    thread opens a group; the groups' hold set to `hold` afterwards (the lone fsync's time moved it)."""
    groups = _groups(results, max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    groups.fsync(3, pid=100, datasync=False, token=3)
    assert results.wait_for({3}, timeout=30)
    groups.hold = hold
    return groups


def test_a_thread_fsyncing_alone_never_waits(disk: _Disk) -> None:
    results = _Results()
    groups = _groups(results, max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    groups.hold = _LONG_HOLD
    for fd in range(3, 10):  # back to back, as a database committing in one thread does
        groups.fsync(fd, pid=100, datasync=False, token=fd)
        assert results.wait_for({fd}, timeout=_LONG_HOLD / 2), "a lone thread's fsync was held for others"
    assert [fd for what, fd in disk.calls] == list(range(3, 10)) and set(results.errors().values()) == {0}


def test_fsyncs_of_concurrent_threads_are_written_back_together_then_synced_in_one_batch(disk: _Disk) -> None:
    results = _Results()
    groups = _after_a_lone_fsync(results, hold=_LONG_HOLD)
    groups.fsync(4, pid=101, datasync=False, token=4)
    assert not results.wait_for({4}, timeout=0.5) and disk.calls == [("fsync", 3)], "held for others to join"
    groups.fsync(5, pid=102, datasync=False, token=5)
    groups.fsync(6, pid=103, datasync=False, token=6)
    assert results.wait_for({4, 5, 6}, timeout=10 * _LONG_HOLD)
    assert results.calls[1:] == [[(4, 0), (5, 0), (6, 0)]], "the group's results come together, once"
    assert disk.calls[1:] == [("writeback", 4), ("writeback", 5), ("writeback", 6),
                              ("batch fsync", 4), ("batch fsync", 5), ("batch fsync", 6)]


def test_fsyncs_further_apart_than_the_window_are_not_grouped(disk: _Disk) -> None:
    results = _Results()
    groups = _groups(results, max_hold=10 * _LONG_HOLD, window=0.05)
    groups.hold = _LONG_HOLD
    groups.fsync(3, pid=100, datasync=False, token=3)
    assert results.wait_for({3}, timeout=30)
    threading.Event().wait(4 * groups.window)  # the next thread comes later than the window: none would join
    groups.fsync(4, pid=101, datasync=False, token=4)
    assert results.wait_for({4}, timeout=_LONG_HOLD / 2), "held for others to join"
    assert disk.calls == [("fsync", 3), ("fsync", 4)]


def test_each_member_of_a_group_gets_its_own_fsync_error(disk: _Disk) -> None:
    disk.failing.add(5)
    results = _Results()
    groups = _after_a_lone_fsync(results, hold=1.0)
    for fd in (4, 5, 6):
        groups.fsync(fd, pid=101 + fd, datasync=False, token=fd)
    assert results.wait_for({3, 4, 5, 6}, timeout=30)
    assert results.errors() == {3: 0, 4: 0, 5: errno.EIO, 6: 0}


def test_fdatasync_stays_fdatasync_alone_and_in_a_group(disk: _Disk) -> None:
    results = _Results()
    groups = _groups(results, max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    groups.fsync(7, pid=100, datasync=True, token=7)
    assert results.wait_for({7}, timeout=30)
    groups.hold = 1.0
    groups.fsync(8, pid=101, datasync=True, token=8)
    groups.fsync(9, pid=102, datasync=False, token=9)
    assert results.wait_for({8, 9}, timeout=30)
    assert [call for call in disk.calls if call[0] != "writeback"] == [
        ("fdatasync", 7), ("batch fdatasync", 8), ("batch fsync", 9)]


def test_a_group_takes_at_most_max_members_then_the_next_one_opens(disk: _Disk,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncgroup, "_MAX_MEMBERS", 2)
    results = _Results()
    groups = _after_a_lone_fsync(results, hold=1.0)
    for fd in (4, 5, 6, 7):
        groups.fsync(fd, pid=100 + fd, datasync=False, token=fd)
    assert results.wait_for({4, 5, 6, 7}, timeout=30)
    assert sorted(results.calls[1:]) == [[(4, 0), (5, 0)], [(6, 0), (7, 0)]]


def test_beyond_its_aio_contexts_a_session_syncs_a_group_one_by_one(disk: _Disk,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncgroup, "_MAX_BATCHES", 0)
    results = _Results()
    groups = _after_a_lone_fsync(results, hold=1.0)
    for fd in (4, 5):
        groups.fsync(fd, pid=100 + fd, datasync=False, token=fd)
    assert results.wait_for({4, 5}, timeout=30)
    assert [call for call in disk.calls if call[0] != "writeback"] == [("fsync", 3), ("fsync", 4), ("fsync", 5)]


def test_without_an_aio_context_a_group_is_synced_one_by_one(disk: _Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(slots: int) -> sysc.FsyncBatch:
        raise OSError(errno.EAGAIN, "fs.aio-max-nr reached")
    monkeypatch.setattr(syncgroup.sysc, "FsyncBatch", refuse)
    disk.failing.add(5)
    results = _Results()
    groups = _after_a_lone_fsync(results, hold=1.0)
    for fd in (4, 5):
        groups.fsync(fd, pid=101 + fd, datasync=False, token=fd)
    assert results.wait_for({4, 5}, timeout=30)
    assert results.errors() == {3: 0, 4: 0, 5: errno.EIO}
    assert [call for call in disk.calls if call[0] != "writeback"] == [("fsync", 3), ("fsync", 4), ("fsync", 5)]


def test_real_files_are_synced_through_a_group(tmp_path: Path) -> None:
    results = _Results()
    groups = _groups(results, max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    groups.hold = 0.5  # the fsyncs below come within it: they form a group (real writeback, a real AIO batch)
    fds = [os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600) for i in range(4)]
    try:
        for fd in fds:
            os.write(fd, b"x" * 4096)
        for i, fd in enumerate(fds):
            groups.fsync(fd, pid=200 + i, datasync=i == 2, token=fd)
        assert results.wait_for(set(fds), timeout=30)
        assert results.errors() == dict.fromkeys(fds, 0)
        assert len(results.calls) == 2, "the first fsync went alone, the three after it as one group"
    finally:
        groups.close()
        for fd in fds:
            os.close(fd)


def test_an_fsync_batch_reports_each_fds_own_result(tmp_path: Path) -> None:
    file_fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o600)
    read_end, write_end = os.pipe()
    closed = os.open(tmp_path / "g", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(closed)
    batch = sysc.FsyncBatch(slots=2)  # fewer slots than requests: sent in turns
    try:
        os.write(file_fd, b"x" * 4096)
        errors = batch.fsync([(file_fd, False), (read_end, False), (file_fd, True), (closed, False)])
        assert errors == [0, errno.EINVAL, 0, errno.EBADF]
        assert batch.fsync([(file_fd, False)] * 5) == [0] * 5  # and it can be used again
    finally:
        batch.close()
        for fd in (file_fd, read_end, write_end):
            os.close(fd)
