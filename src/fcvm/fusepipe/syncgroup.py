"""Group commit for a session's fsyncs: fsyncs from concurrent guest threads share the host's journal commits.

Why: a guest's writers reach the server one after another (their creates queue on the guest's directory lock),
so each FSYNC used to find the host's journal idle and paid a commit of its own: 230-250 jbd2 commits for the
256 files of bench/fusepipe.py's write run, against 20-25 when the host's own 32 threads fsync the same files
together. Those commits (and the disk flushes each one issues) took the two cores from the requests that make
the run.

The rule follows jbd2's for synchronous transactions (`jbd2_journal_stop`, which sleeps for the time of one
commit when the last synchronous writer was another thread): an fsync from another thread than the last one,
arriving less than `window` after it, waits for others to join while they keep coming, each extending the wait
by `hold` (the measured time of one fsync, bounded), at most `max_hold` in all. When the wait ends, every
member's dirty data is sent to the disk at once (so all of it lands in one transaction), then each member fsyncs
its own file, in parallel: the first of them commits the transaction, the others find it committed. A thread
that fsyncs alone never waits, and neither does an fsync that comes later than `window` after the one before.

Durability is unchanged: every FSYNC still returns only after fsync(2) of its own fd returned, with its error.
"""

from __future__ import annotations

import os
import threading
import time

from fcvm.fusepipe import sysc

# The hold follows the measured time of one fsync, within these bounds; a group waits at most max_hold in all.
_HOLD_MIN = 0.0002
_HOLD_MAX = 0.005
# How soon after another thread's fsync one must come to open a group: a group's longest hold and the fsyncs
# that end it, so that the writers coming back from one group open the next. Opening a group only within one
# fsync time of the last left nearly twice the journal commits (docs/PERFORMANCE.md).
_WINDOW = 2 * _HOLD_MAX
_SMOOTHING = 0.2  # weight of the newest fsync time in the running estimate


class _Group:
    def __init__(self, fd: int, now: float, hold: float) -> None:
        self.fds = [fd]
        self.released = False
        self.opened = now
        self.closes = now + hold  # each member that joins moves this to its own arrival + hold


class SyncGroups:
    """fsync for one session's requests; see the module's docstring."""

    def __init__(self, max_hold: float = _HOLD_MAX, window: float = _WINDOW) -> None:
        self.max_hold = max_hold
        self.window = window
        self._cond = threading.Condition()
        self._gathering: _Group | None = None
        self._last_pid = 0
        self._last_arrival = float("-inf")
        self.hold = _HOLD_MIN

    def fsync(self, fd: int, pid: int, datasync: bool) -> None:
        """fsync (or fdatasync) `fd` for the guest thread `pid` (the FUSE request's caller)."""
        now = time.monotonic()
        with self._cond:
            group = self._gathering
            leads = False
            if group is not None:
                group.fds.append(fd)
                group.closes = now + self.hold
                while not group.released:
                    self._cond.wait()
            elif pid != self._last_pid and now - self._last_arrival < self.window:
                group = self._gathering = _Group(fd, now, self.hold)
                leads = True
            self._last_pid, self._last_arrival = pid, now
        if leads:
            assert group is not None
            self._release(group)
        started = time.monotonic()
        (os.fdatasync if datasync else os.fsync)(fd)
        if group is None or leads:  # one estimate per sync the host's journal saw first
            taken = time.monotonic() - started
            self.hold = min(self.max_hold, max(_HOLD_MIN, self.hold + _SMOOTHING * (taken - self.hold)))

    def _release(self, group: _Group) -> None:
        while True:
            with self._cond:
                wait = min(group.closes, group.opened + self.max_hold) - time.monotonic()
                if wait <= 0:
                    self._gathering = None  # later fsyncs start the next group
                    break
            time.sleep(wait)
        for fd in group.fds:
            sysc.start_writeback(fd)
        with self._cond:
            group.released = True
            self._cond.notify_all()
