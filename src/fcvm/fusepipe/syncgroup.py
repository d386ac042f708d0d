"""Group commit for a session's fsyncs: fsyncs from concurrent guest threads share the host's journal commits.

Why: a guest's writers reach the server one after another (their creates queue on the guest's directory lock),
so each FSYNC used to find the host's journal idle and paid a commit of its own: 230-250 jbd2 commits for the
256 files of bench/fusepipe.py's write run, against 20-25 when the host's own 32 threads fsync the same files
together. Those commits (and the disk flushes each one issues) took the two cores from the requests that make
the run.

The rule follows jbd2's for synchronous transactions (`jbd2_journal_stop`, which sleeps for the time of one
commit when the last synchronous writer was another thread): an fsync from another thread than the last one,
arriving less than `window` after it, opens a group, and the group waits for others to join while they keep
coming, each extending the wait by `hold` (the measured time of one fsync, bounded), at most `max_hold` in all.
Then every member's dirty data is sent to the disk at once (so all of it lands in one transaction), and all the
members' fsyncs are submitted together (`sysc.FsyncBatch`): each enters fsync before the first one's commit
has flushed the disk, so one commit and its flush serve them all, where fsyncs coming one after another each
flush again. A thread that fsyncs alone never waits, and neither does an fsync that comes later than `window`
after the one before.

Nothing blocks the caller: a member only joins its group, and the sync of a group (or of a lone fsync) runs
through `run` (the server's pool); `synced` gets every result of one group at once, so the replies leave in one
send and no thread per member wakes up when the commit ends (a crowd of them, each taking the GIL in turn, held
up the server's reader thread after every commit).

Durability is unchanged: every result is fsync(2)'s (or fdatasync(2)'s) own for that fd.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from fcvm.core import log
from fcvm.fusepipe import sysc

_log = log.get("fusepipe")

# The hold follows the measured time of one fsync, within these bounds; a group waits at most max_hold in all.
_HOLD_MIN = 0.0002
_HOLD_MAX = 0.005
# How soon after another thread's fsync one must come to open a group: a group's longest hold and the fsyncs
# that end it, so that the writers coming back from one group open the next. Opening a group only within one
# fsync time of the last left nearly twice the journal commits (docs/PERFORMANCE.md).
_WINDOW = 2 * _HOLD_MAX
_SMOOTHING = 0.2  # weight of the newest fsync time in the running estimate
# A guest decides how many FSYNCs it sends: a group takes at most this many (then the next one opens), and a
# session keeps at most this many AIO contexts (groups beyond them sync one fd after another). The host's AIO
# events (fs.aio-max-nr) are shared with every other program on it.
_MAX_MEMBERS = 64
_MAX_BATCHES = 2

Token = TypeVar("Token")  # what the caller knows an fsync by (the server: the request's header)


class _Group(Generic[Token]):
    def __init__(self, now: float, hold: float) -> None:
        self.members: list[tuple[int, bool, Token]] = []  # fd, datasync, token
        self.opened = now
        self.closes = now + hold  # each member that joins moves this to its own arrival + hold


class SyncGroups(Generic[Token]):
    """fsync for one session's requests; see the module's docstring. `synced` gets the (token, errno: 0 if
    synced) of every fsync done together."""

    def __init__(self, run: Callable[[Callable[[], None]], None],
                 synced: Callable[[list[tuple[Token, int]]], None], max_hold: float = _HOLD_MAX,
                 window: float = _WINDOW) -> None:
        self.run = run
        self.synced = synced
        self.max_hold = max_hold
        self.window = window
        self.hold = _HOLD_MIN
        self._lock = threading.Lock()
        self._gathering: _Group[Token] | None = None
        self._last_pid = 0
        self._last_arrival = float("-inf")
        self._batches: list[sysc.FsyncBatch] = []  # idle ones: one per group being synced at a time
        self._batch_count = 0  # made and not closed
        self._warned = False
        self._closed = False

    def fsync(self, fd: int, pid: int, datasync: bool, token: Token) -> None:
        """fsync (or fdatasync) `fd` for the guest thread `pid` (the FUSE request's caller); `synced` gets
        `token` and the result. Returns at once."""
        now = time.monotonic()
        with self._lock:
            group = self._gathering
            opens = False
            if group is not None:
                group.closes = now + self.hold
            elif pid != self._last_pid and now - self._last_arrival < self.window:
                group = self._gathering = _Group[Token](now, self.hold)
                opens = True
            if group is not None:
                group.members.append((fd, datasync, token))
                if len(group.members) >= _MAX_MEMBERS:
                    self._gathering = None
            self._last_pid, self._last_arrival = pid, now
        if group is None:
            self.run(lambda: self._sync_alone(fd, datasync, token))
        elif opens:
            self.run(lambda: self._sync_group(group))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._batches = self._batches, []
            self._batch_count -= len(idle)
        for batch in idle:
            batch.close()

    def _estimate(self, taken: float) -> None:
        """One more measured fsync time (one per sync the host's journal saw first)."""
        self.hold = min(self.max_hold, max(_HOLD_MIN, self.hold + _SMOOTHING * (taken - self.hold)))

    def _new_batch(self) -> sysc.FsyncBatch | None:
        """A new AIO context, or None if the host has none left (fs.aio-max-nr): then one fd after another."""
        try:
            return sysc.FsyncBatch(slots=_MAX_MEMBERS)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _log.warning("fuse-pipe: no AIO context for grouped fsyncs (%s); syncing them one by one", exc)
            return None

    def _sync_alone(self, fd: int, datasync: bool, token: Token) -> None:
        started = time.monotonic()
        error = sysc.fsync_errno(fd, datasync)
        self._estimate(time.monotonic() - started)
        self.synced([(token, error)])

    def _sync_group(self, group: _Group[Token]) -> None:
        """Wait while others join, write all back, fsync all at once, hand over the results."""
        while True:
            with self._lock:
                wait = min(group.closes, group.opened + self.max_hold) - time.monotonic()
                if wait <= 0:
                    if self._gathering is group:
                        self._gathering = None  # later fsyncs open the next group
                    batch = self._batches.pop() if self._batches else None
                    make = batch is None and self._batch_count < _MAX_BATCHES
                    if make:
                        self._batch_count += 1
                    break
            time.sleep(wait)
        requests = [(fd, datasync) for fd, datasync, _ in group.members]
        errors = [errno.EIO] * len(requests)
        try:
            for fd, _ in requests:
                sysc.start_writeback(fd)
            if make:
                batch = self._new_batch()
            started = time.monotonic()
            if batch is not None:
                errors = batch.fsync(requests)
            else:
                errors = [sysc.fsync_errno(fd, datasync) for fd, datasync in requests]
            self._estimate(time.monotonic() - started)
        finally:
            with self._lock:
                if batch is not None and not self._closed:
                    self._batches.append(batch)
                    batch = None
                elif make or batch is not None:  # made and failed, or to be closed: its place is free
                    self._batch_count -= 1
            if batch is not None:
                batch.close()
            self.synced([(token, error) for (_, _, token), error in zip(group.members, errors, strict=True)])
