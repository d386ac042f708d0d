"""Group commit of a session's fsyncs (fcvm.fusepipe.syncgroup): who waits, who does not, and what each gets."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator

import pytest

from fcvm.fusepipe import syncgroup
from fcvm.fusepipe.syncgroup import SyncGroups

pytestmark = pytest.mark.unit

_LONG_HOLD = 2.0  # far longer than any wait below: a request that was held cannot finish in time


class _Disk:
    """Stands in for the host's fsync(2), fdatasync(2) and writeback, recording what reached them in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.failing: set[int] = set()

    def recorder(self, what: str) -> Callable[[int], None]:
        def call(fd: int) -> None:
            with self.lock:
                self.calls.append((what, fd))
            if what != "writeback" and fd in self.failing:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return call

    def synced(self) -> list[int]:
        with self.lock:
            return [fd for what, fd in self.calls if what != "writeback"]


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Disk]:
    fake = _Disk()
    monkeypatch.setattr(syncgroup.os, "fsync", fake.recorder("fsync"))
    monkeypatch.setattr(syncgroup.os, "fdatasync", fake.recorder("fdatasync"))
    monkeypatch.setattr(syncgroup.sysc, "start_writeback", fake.recorder("writeback"))
    yield fake


def _in_thread(groups: SyncGroups, fd: int, pid: int, errors: dict[int, OSError]) -> threading.Thread:
    def run() -> None:
        try:
            groups.fsync(fd, pid, datasync=False)
        except OSError as e:
            errors[fd] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _poll(condition: Callable[[], bool], deadline: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(deadline / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not met in time")


def test_a_thread_fsyncing_alone_never_waits(disk: _Disk) -> None:
    groups = SyncGroups(max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    groups.fsync(3, pid=100, datasync=False)
    groups.hold = _LONG_HOLD
    errors: dict[int, OSError] = {}
    for fd in range(4, 10):  # back to back, as a database committing in one thread does
        thread = _in_thread(groups, fd, 100, errors)
        thread.join(timeout=_LONG_HOLD / 2)
        assert not thread.is_alive(), "a lone thread's fsync was held for others"
    assert disk.synced() == list(range(3, 10)) and not errors


def test_fsyncs_of_concurrent_threads_are_written_back_together_then_each_synced(disk: _Disk) -> None:
    groups = SyncGroups(max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    groups.fsync(3, pid=100, datasync=False)  # another thread's recent fsync: the next one from elsewhere waits
    groups.hold = _LONG_HOLD
    errors: dict[int, OSError] = {}
    first = _in_thread(groups, 4, 101, errors)
    first.join(timeout=0.5)
    assert first.is_alive() and disk.synced() == [3], "held for others to join"
    joined = [_in_thread(groups, fd, 102 + fd, errors) for fd in (5, 6)]
    for thread in [first, *joined]:
        thread.join(timeout=3 * _LONG_HOLD)
        assert not thread.is_alive()
    assert not errors
    after_alone = disk.calls[1:]
    assert sorted(after_alone[:3]) == [("writeback", 4), ("writeback", 5), ("writeback", 6)]
    assert sorted(after_alone[3:]) == [("fsync", 4), ("fsync", 5), ("fsync", 6)]


def test_fsyncs_further_apart_than_the_window_are_not_grouped(disk: _Disk) -> None:
    groups = SyncGroups(max_hold=10 * _LONG_HOLD, window=0.05)
    groups.fsync(3, pid=100, datasync=False)
    groups.hold = _LONG_HOLD
    threading.Event().wait(4 * groups.window)  # the next thread comes later than the window: none would join
    groups.fsync(4, pid=101, datasync=False)
    assert disk.calls == [("fsync", 3), ("fsync", 4)], "held and written back as a group"


def test_each_member_of_a_group_gets_its_own_fsync_error(disk: _Disk) -> None:
    disk.failing.add(5)
    groups = SyncGroups(max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    groups.fsync(3, pid=100, datasync=False)
    groups.hold = 1.0
    errors: dict[int, OSError] = {}
    threads = [_in_thread(groups, fd, 101 + fd, errors) for fd in (4, 5, 6)]
    for thread in threads:
        thread.join(timeout=30)
    _poll(lambda: sorted(disk.synced()) == [3, 4, 5, 6])
    assert list(errors) == [5] and errors[5].errno == errno.EIO


def test_fdatasync_stays_fdatasync(disk: _Disk) -> None:
    SyncGroups().fsync(7, pid=100, datasync=True)
    assert disk.calls == [("fdatasync", 7)]


def test_real_files_are_synced_through_a_group(tmp_path: os.PathLike[str]) -> None:
    groups = SyncGroups(max_hold=10 * _LONG_HOLD, window=10 * _LONG_HOLD)
    fds = [os.open(os.path.join(tmp_path, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o600) for i in range(3)]
    try:
        for fd in fds:
            os.write(fd, b"x" * 4096)
        groups.fsync(fds[0], pid=199, datasync=False)
        groups.hold = 0.5  # the threads below come within it: they form a group (real writeback, real fsync)
        errors: dict[int, OSError] = {}
        threads = [_in_thread(groups, fd, 200 + i, errors) for i, fd in enumerate(fds)]
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive()
        assert not errors
    finally:
        for fd in fds:
            os.close(fd)
