"""The UFFD page server: Firecracker's handshake, demand faults, REMOVE events, fault-around, prefetch.

One event-loop thread (epoll) owns the listening socket, every handshake, every client's uffd, socket
and pidfd. One prefetch thread copies recorded working sets in large batches; it takes a client's lock
around each batch, and the loop takes the same lock around reading that client's events, so a batch can
never land in a range whose REMOVE has already been read (the kernel zaps the range right after that
read). Demand faults never wait for more than one batch.

Holes of the memory file are served with UFFDIO_ZEROPAGE (the kernel's shared zero page) and never
prefetched or recorded; everything else is copied from the server's read-only mapping of the file.

Fail closed: a uffd is closed only once its VM process has exited (pidfd), never while it lives.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import functools
import mmap
import os
import re
import select
import signal
import socket
import struct
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcvm.core import log, paths
from fcvm.uffd import holes, ioctls, memory, workingset
from fcvm.uffd.handshake import HandshakeError, JsonFramer, Region, parse_regions
from fcvm.uffd.metrics import ClientMetrics

_log = log.get("uffd")

# Per-page states. HOLE: missing, and inside a hole of the memory file (zero-page kind, not copied).
MISSING, PRESENT, REMOVED, ZEROED, HOLE = 0, 1, 2, 3, 4
_ZERO_KIND = (REMOVED, ZEROED, HOLE)
# Prefetch fills MISSING runs only: HOLE pages cost nothing to fault on demand (a zero-page mapping),
# so prefetching them would only allocate private zeros.
_MISSING_RUN = re.compile(b"\x00+")
_HUGE_ZEROS = 1 << 30  # the largest huge page: one copy from the zero source fills at least one page
_CRED = struct.Struct("3i")
_READ_MSGS = 64
_MAX_ENDED = 256
_EPOLLIN = select.EPOLLIN
_EPOLLBAD = select.EPOLLERR | select.EPOLLHUP


class ClientGone(Exception):
    """The client's address space no longer exists (ESRCH)."""


@dataclass
class ServeConfig:
    mem_file: Path
    socket: Path
    fault_around: int = 64 * 1024
    prefetch: bool = True
    working_set: Path | None = None  # default: next to the memory file
    prefetch_batch: int = 1 << 20
    handshake_timeout: float = 10.0
    shutdown_grace: float = 10.0
    metrics_interval: float = 1.0
    # Called in a helper thread on SIGTERM before the server exits: stop the VMs it serves.
    stop_clones: Callable[[Server], None] | None = None
    # Called about every `metrics_interval` seconds and on exit with the metrics JSON.
    publish: Callable[[dict[str, Any]], None] | None = None


@dataclass
class _Pending:
    conn: socket.socket
    cred: tuple[int, int, int]
    deadline: float
    framer: JsonFramer = field(default_factory=JsonFramer)
    fds: list[int] = field(default_factory=list)


class _Segment:
    """Part of one region, in pages, in the order the prefetcher walks it."""

    __slots__ = ("hi", "lo", "region_index")

    def __init__(self, region_index: int, lo: int, hi: int) -> None:
        self.region_index, self.lo, self.hi = region_index, lo, hi


class Client:
    """One connected VM: its uffd, regions, per-page state and metrics."""

    def __init__(
        self, key: str, conn: socket.socket | None, uffd: int, pidfd: int | None, regions: list[Region],
        metrics: ClientMetrics, hole_map: holes.HoleMap,
    ) -> None:
        self.key = key
        self.conn = conn
        self.uffd = uffd
        self.pidfd = pidfd
        self.regions = regions
        self.bases = [r.base for r in regions]
        self.states = [bytearray(r.size // r.page_size) for r in regions]
        self.metrics = metrics
        for state, region in zip(self.states, regions, strict=True):
            # UFFDIO_ZEROPAGE exists only for base pages (hugetlbfs rejects it with EINVAL, and has no
            # shared zero page to gain): in huge regions a hole is data, copied from the file's zeros.
            if region.page_size != mmap.PAGESIZE:
                continue
            for lo, hi in hole_map.page_runs(region.offset, region.size, region.page_size):
                state[lo:hi] = bytes([HOLE]) * (hi - lo)
                metrics.hole_bytes += (hi - lo) * region.page_size
        self.lock = threading.Lock()
        self.closed = False
        self.polling_uffd = True
        self.deferred: collections.deque[int] = collections.deque()
        self.recorder: workingset.Recorder | None = None
        self.copier = ioctls.Copier()  # used by the event loop only

    def region_at(self, addr: int) -> int:
        i = bisect.bisect_right(self.bases, addr) - 1
        if i >= 0 and addr < self.regions[i].end:
            return i
        return -1


class Server:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.mem_file = config.mem_file
        self.mem_size = self.mem_file.stat().st_size
        if self.mem_size == 0:
            raise ValueError(f"memory file {self.mem_file} is empty")
        if config.fault_around < 4096 or config.fault_around & (config.fault_around - 1):
            raise ValueError("fault-around must be a power of two >= 4096 bytes")
        self.ws_path = config.working_set or workingset.path_for_mem_file(self.mem_file)
        self.started = time.time()
        self.state = "starting"
        self.events: list[dict[str, Any]] = []
        self.rejected = 0
        self.clients_total = 0
        self._clients: dict[str, Client] = {}
        self._ended: collections.deque[ClientMetrics] = collections.deque(maxlen=_MAX_ENDED)
        self._fd_handlers: dict[int, Callable[[int], None]] = {}
        self._pending: dict[int, _Pending] = {}
        self._quarantine: dict[int, list[int]] = {}  # pidfd -> uffds of rejected but live clients
        self._ws: list[workingset.Run] | None = None
        self._recording: Client | None = None
        self._seq = 0
        self._stopping = False
        self._stop_reason = ""
        self._clones_done = threading.Event()
        self._clones_done_at = 0.0
        self._done = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep = select.epoll()
        self._listener: socket.socket | None = None
        self._prefetch_jobs: collections.deque[_PrefetchJob] = collections.deque()
        self._prefetch_cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        fd = os.open(self.mem_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.holes = holes.find(fd, self.mem_size)
            self.src_base = memory.map_file_readonly(fd, self.mem_size)
        finally:
            os.close(fd)
        # Removed huge pages must read as zeros, but hugetlbfs has no UFFDIO_ZEROPAGE: they are copied from
        # this never-written anonymous mapping (reads of it see the zero page; reserving it costs nothing).
        self.zeros = memory.map_memory(_HUGE_ZEROS, mmap.PROT_READ,
                                       mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | memory.MAP_NORESERVE)
        if config.prefetch:
            self._ws = workingset.load(self.ws_path, self.mem_file)

    # --- public -----------------------------------------------------------------------------------

    def note(self, event: str, **data: Any) -> None:
        """Record a lifecycle event (shown in the metrics JSON)."""
        self.events.append({"t": round(time.time(), 6), "event": event, **data})

    def request_stop(self, reason: str = "requested") -> None:
        """Thread- and signal-safe: ask the loop to stop its clones and exit."""
        self._stop_reason = self._stop_reason or reason
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")


    def metrics(self) -> dict[str, Any]:
        clients = [c.metrics for c in list(self._clients.values())] + list(self._ended)
        return {
            "server": {
                "pid": os.getpid(),
                "state": self.state,
                "started": self.started,
                "socket": str(self.config.socket),
                "mem_file": str(self.mem_file),
                "mem_size": self.mem_size,
                "mem_hole_bytes": self.holes.total,
                "fault_around": self.config.fault_around,
                "prefetch": self.config.prefetch,
                "working_set": str(self.ws_path) if self.config.prefetch else None,
                "working_set_bytes": workingset.total(self._ws) if self._ws else 0,
                "clients_total": self.clients_total,
                "clients_live": len(self._clients),
                "rejected": self.rejected,
                "events": list(self.events),
            },
            "clients": [m.to_json() for m in clients],
        }

    def serve_forever(self, *, install_signals: bool = True) -> None:
        """Listen and serve until stopped (SIGTERM/SIGINT or request_stop())."""
        old_handlers: dict[signal.Signals, Any] = {}
        old_wakeup = -1
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                old_handlers[signum] = signal.signal(signum, self._on_signal)
            old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            self._listen()
            self._start_threads()
            self.state = "serving"
            self.note("listening", socket=str(self.config.socket))
            _log.info(
                "serving %s (%d MiB, %d MiB of it holes) on %s, fault-around %d KiB, prefetch %s",
                self.mem_file, self.mem_size >> 20, self.holes.total >> 20, self.config.socket,
                self.config.fault_around >> 10,
                ("on, working set " + (f"{workingset.total(self._ws) >> 20} MiB" if self._ws else "to record"))
                if self.config.prefetch else "off",
            )
            self._loop()
        finally:
            self._shutdown()
            if install_signals:
                signal.set_wakeup_fd(old_wakeup)
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)

    # --- setup ------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.request_stop(signal.Signals(signum).name)

    def _listen(self) -> None:
        path = self.config.socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        paths.bind_private(sock, path)  # a client reads the snapshot's memory: guest secrets
        sock.listen(128)
        self._listener = sock
        self._watch(sock.fileno(), self._on_accept)
        self._watch(self._wake_r, self._on_wake)

    def _start_threads(self) -> None:
        for name, target in (("uffd-prefetch", self._prefetch_worker), ("uffd-metrics", self._metrics_worker)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch(self, fd: int, handler: Callable[[int], None]) -> None:
        self._fd_handlers[fd] = handler
        self._ep.register(fd, _EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        if self._fd_handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    # --- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            timeout = 1.0
            if any(c.deferred for c in self._clients.values()):
                timeout = 0.001
            elif self._stopping:
                timeout = 0.05
            elif self._pending:
                timeout = max(0.0, min(p.deadline for p in self._pending.values()) - time.monotonic())
            for fd, mask in self._ep.poll(timeout, 256):
                handler = self._fd_handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(mask)
                except Exception as exc:  # a bug must not take every VM down with it
                    _log.exception("internal error handling fd %d: %s", fd, exc)
            for client in list(self._clients.values()):
                if client.deferred and not client.closed:
                    self._serve_client(client, read=False)
            if self._pending:
                self._expire_handshakes()
            if self._stopping and self._ready_to_exit():
                return

    def _on_wake(self, _mask: int) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        if self._stop_reason and not self._stopping:
            self._begin_stop()

    def _begin_stop(self) -> None:
        self._stopping = True
        self.state = "stopping"
        self.note("stop", reason=self._stop_reason)
        _log.info("stopping (%s): stopping clones first, serving faults meanwhile", self._stop_reason)
        if self._listener is not None:
            self._unwatch(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()
        for fd in list(self._pending):
            self._reject(self._pending.pop(fd), "server is shutting down")
        thread = threading.Thread(target=self._stop_clones, name="uffd-stop-clones", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _stop_clones(self) -> None:
        try:
            if self.config.stop_clones is not None:
                self.config.stop_clones(self)
        except Exception as exc:
            _log.error("stopping clones failed: %s", exc)
        finally:
            self.note("clones-stopped")
            self._clones_done_at = time.monotonic()
            self._clones_done.set()
            self.request_stop()

    def _ready_to_exit(self) -> bool:
        if not self._clones_done.is_set():
            return False
        if not self._clients:
            return True
        if time.monotonic() - self._clones_done_at < self.config.shutdown_grace:
            return False
        for client in self._clients.values():
            _log.error(
                "client pid %d is still alive %.0f s after the clones stopped; exiting anyway: its VM keeps"
                " its own uffd reference and will stall on its next fault rather than read zeros",
                client.metrics.pid, self.config.shutdown_grace,
            )
        return True

    def _shutdown(self) -> None:
        self.state = "exited"
        self._done.set()
        with self._prefetch_cv:
            self._prefetch_cv.notify_all()
        for client in list(self._clients.values()):
            self._end_client(client, "server exit")
        for pending in list(self._pending.values()):
            self._reject(pending, "server exit")
        self._pending.clear()
        for pidfd, fds in self._quarantine.items():
            for fd in [pidfd, *fds]:
                _close(fd)
        self._quarantine.clear()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()
        self.note("exit")
        for thread in self._threads:
            if thread.name != "uffd-stop-clones":
                thread.join(timeout=5)
        self._publish()
        self._ep.close()
        _close(self._wake_r)
        _close(self._wake_w)
        with contextlib.suppress(OSError):
            memory.unmap(self.src_base, self.mem_size)
            memory.unmap(self.zeros, _HUGE_ZEROS)

    # --- handshakes -------------------------------------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                _log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            try:
                cred = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            except OSError:
                cred = (0, -1, -1)
            pending = _Pending(conn, cred, time.monotonic() + self.config.handshake_timeout)
            # Whoever is served reads the snapshot's memory. The socket's mode already keeps others out; this
            # holds even if the socket was made reachable (a chmod, a path in a shared directory).
            if cred[1] not in (0, os.geteuid()):
                self._reject(pending, f"uid {cred[1]} may not be served (only uid {os.geteuid()} and root)")
                continue
            self._pending[conn.fileno()] = pending
            self._watch(conn.fileno(), functools.partial(self._on_handshake_data, conn.fileno()))

    def _on_handshake_data(self, fd: int, _mask: int) -> None:
        pending = self._pending.get(fd)
        if pending is None:
            return
        try:
            data, ancdata, flags, _ = pending.conn.recvmsg(
                65536, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError as exc:
            self._reject(self._pending.pop(fd), f"receive failed: {exc}")
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                pending.fds.extend(array("i", payload[: len(payload) - len(payload) % 4]))
        try:
            if flags & socket.MSG_CTRUNC:
                raise HandshakeError("too many file descriptors (control data truncated)")
            if not data:
                raise HandshakeError("connection closed before the handshake's JSON was complete")
            payload_json = pending.framer.feed(data)
            if payload_json is None:
                return
            if len(pending.fds) != 1:
                raise HandshakeError(f"expected exactly one fd (the uffd) by SCM_RIGHTS, got {len(pending.fds)}")
            if not ioctls.is_userfaultfd(pending.fds[0]):
                raise HandshakeError("the fd sent is not a userfaultfd")
            regions = parse_regions(payload_json, self.mem_size)
        except HandshakeError as exc:
            self._reject(self._pending.pop(fd), str(exc))
            return
        del self._pending[fd]
        self._unwatch(fd)
        self._admit(pending, regions)

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for fd, pending in list(self._pending.items()):
            if pending.deadline <= now:
                del self._pending[fd]
                self._reject(pending, f"no complete handshake within {self.config.handshake_timeout:g} s")

    def _reject(self, pending: _Pending, reason: str) -> None:
        pid, uid, gid = pending.cred
        self.rejected += 1
        _log.error("rejected handshake from pid %d: %s; closing that connection", pid, reason)
        metrics = ClientMetrics(f"{pid}-rejected-{self.rejected}", pid, uid, gid, state="rejected")
        metrics.last_error = reason
        metrics.ended = time.time()
        self._ended.append(metrics)
        self._unwatch(pending.conn.fileno())
        pending.conn.close()
        uffds = [fd for fd in pending.fds if ioctls.is_userfaultfd(fd)]
        for fd in pending.fds:
            if fd not in uffds:
                _close(fd)
        if not uffds:
            return
        # Fail closed: a live process's uffd stays open until that process exits.
        pidfd = _pidfd(pid)
        if pidfd is None:
            for fd in uffds:
                _close(fd)
            return
        self._quarantine[pidfd] = uffds
        self._watch(pidfd, functools.partial(self._release_quarantine, pidfd))

    def _release_quarantine(self, pidfd: int, _mask: int) -> None:
        self._unwatch(pidfd)
        for fd in self._quarantine.pop(pidfd, []):
            _close(fd)
        _close(pidfd)

    def _admit(self, pending: _Pending, regions: list[Region]) -> None:
        pid, uid, gid = pending.cred
        uffd = pending.fds[0]
        os.set_blocking(uffd, False)
        pidfd = _pidfd(pid)
        if pidfd is None and pid > 0 and not os.path.exists(f"/proc/{pid}"):
            self._reject(pending, "the client exited during the handshake")
            return
        self._seq += 1
        self.clients_total += 1
        key = f"{pid}-{self._seq}"
        metrics = ClientMetrics(key, pid, uid, gid)
        metrics.regions = len(regions)
        metrics.memory_bytes = sum(r.size for r in regions)
        client = Client(key, pending.conn, uffd, pidfd, regions, metrics, self.holes)
        self._clients[key] = client
        self._watch(uffd, functools.partial(self._on_uffd, client))
        self._watch(pending.conn.fileno(), functools.partial(self._on_conn, client))
        if pidfd is not None:
            self._watch(pidfd, functools.partial(self._on_exit, client))
        self.note("client", client=key, pid=pid)
        _log.info(
            "client %s (pid %d, uid %d): %d region(s), %d MiB",
            key, pid, uid, len(regions), metrics.memory_bytes >> 20,
        )
        if self.config.prefetch:
            self._start_prefetch_or_record(client)

    # --- per-client events ------------------------------------------------------------------------

    def _on_exit(self, client: Client, _mask: int) -> None:
        self._end_client(client, "process exited")

    def _on_conn(self, client: Client, _mask: int) -> None:
        assert client.conn is not None
        try:
            data = client.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # Firecracker sends nothing after the handshake; ignore it
        self._unwatch(client.conn.fileno())
        client.conn.close()
        client.conn = None
        if client.pidfd is None:
            self._end_client(client, "socket closed")
        else:
            _log.debug("client %s closed its socket; serving until its process exits", client.key)

    def _on_uffd(self, client: Client, mask: int) -> None:
        if client.closed:
            return
        if mask & _EPOLLBAD and not mask & _EPOLLIN:
            _log.error("client %s: its uffd reports an error; no longer polling it", client.key)
            self._unwatch(client.uffd)
            client.polling_uffd = False
            if client.pidfd is None:
                self._end_client(client, "uffd error")
            return
        self._serve_client(client, read=True)

    def _read_events(self, client: Client) -> list[int]:
        """Read pending messages (under the client's lock); apply REMOVEs; return fault addresses."""
        faults: list[int] = []
        with client.lock:
            if client.closed:
                return faults
            for _ in range(16):
                try:
                    data = os.read(client.uffd, ioctls.MSG_SIZE * _READ_MSGS)
                except BlockingIOError:
                    break
                except OSError as exc:
                    raise ClientGone(str(exc)) from exc
                for kind, a, b, _ in ioctls.MSG.iter_unpack(data[: len(data) - len(data) % ioctls.MSG_SIZE]):
                    if kind == ioctls.UFFD_EVENT_PAGEFAULT:
                        faults.append(b)
                    elif kind == ioctls.UFFD_EVENT_REMOVE:
                        self._apply_remove(client, a, b)
                    else:
                        _log.debug("client %s: ignoring uffd event %#x", client.key, kind)
                if len(data) < ioctls.MSG_SIZE * _READ_MSGS:
                    break
        return faults

    def _apply_remove(self, client: Client, start: int, end: int) -> None:
        m = client.metrics
        m.removes += 1
        for i, region in enumerate(client.regions):
            lo, hi = max(start, region.base), min(end, region.end)
            if lo >= hi:
                continue
            ps = region.page_size
            a, b = (lo - region.base) // ps, -(-(hi - region.base) // ps)
            client.states[i][a:b] = bytes([REMOVED]) * (b - a)
            m.removed_bytes += (b - a) * ps

    def _serve_client(self, client: Client, *, read: bool) -> None:
        try:
            if read:
                client.deferred.extend(self._read_events(client))
            attempts = 0
            while client.deferred and not client.closed:
                addr = client.deferred[0]
                if self._serve_fault(client, addr):
                    client.deferred.popleft()
                    attempts = 0
                    continue
                # EAGAIN: a REMOVE is pending. Drain the events, then retry; give up for this round
                # after a few tries (the loop comes back within a millisecond).
                client.metrics.eagain += 1
                attempts += 1
                client.deferred.extend(self._read_events(client))
                if attempts > 8:
                    return
                if attempts > 2:
                    os.sched_yield()
        except ClientGone as exc:
            self._end_client(client, f"address space gone ({exc})")
        except ioctls.UffdError as exc:
            client.metrics.errors += 1
            client.metrics.last_error = str(exc)
            client.metrics.state = "error"
            if client.deferred:
                client.deferred.popleft()  # that VM thread stays blocked: fail closed, never zero-fill
            _log.error("client %s: %s (the faulting VM thread stays blocked)", client.key, exc)

    def _serve_fault(self, client: Client, addr: int) -> bool:
        """Fill the fault-around window of `addr`. False when EAGAIN asks for a retry."""
        t0 = time.perf_counter_ns()
        ri = client.region_at(addr)
        m = client.metrics
        if ri < 0:
            raise ioctls.UffdError(errno.EFAULT, f"fault at {addr:#x} outside every region")
        region = client.regions[ri]
        states = client.states[ri]
        ps = region.page_size
        idx = (addr - region.base) // ps
        state = states[idx]
        if state in (MISSING, REMOVED, HOLE):
            # the run of pages in the fault's state around it, within its aligned window: a window
            # never mixes copied pages with zero pages, nor missing pages with present ones
            window = max(1, self.config.fault_around // ps)
            ws = idx - idx % window
            we = min(ws + window, len(states))
            seg = states[ws:we]
            mark = seg[idx - ws : idx - ws + 1]
            left = seg[: idx - ws]
            right = seg[idx - ws + 1 :]
            lo = idx - (len(left) - len(left.rstrip(mark)))
            hi = idx + 1 + (len(right) - len(right.lstrip(mark)))
        else:  # believed present: stale after a race; fill just this page
            lo, hi = idx, idx + 1
        zero = state in _ZERO_KIND
        filled = self._fill(client, ri, lo, hi, zero=zero, fault_page=idx)
        if filled is None:
            return False
        m.faults += 1
        if zero:
            m.zero_faults += 1
            m.zero_bytes += filled
        else:
            m.bytes_copied += filled
        m.latency.add(time.perf_counter_ns() - t0)
        return True

    def _fill(self, client: Client, ri: int, lo: int, hi: int, *, zero: bool, fault_page: int) -> int | None:
        """Copy (or zero) pages [lo, hi) of region `ri`; EEXIST counts as done. None on EAGAIN."""
        region = client.regions[ri]
        states = client.states[ri]
        ps = region.page_size
        fd = client.uffd
        copier = client.copier
        filled = 0
        pos = lo
        fault_done = False
        new_state = ZEROED if zero else PRESENT
        while pos < hi:
            dst = region.base + pos * ps
            length = (hi - pos) * ps
            try:
                if zero and ps == mmap.PAGESIZE:
                    n = copier.zeropage(fd, dst, length)
                elif zero:
                    n = copier.copy(fd, dst, self.zeros, min(length, _HUGE_ZEROS))
                else:
                    n = copier.copy(fd, dst, self.src_base + region.offset + pos * ps, length)
            except ioctls.UffdError as exc:
                n = exc.done
                if n:
                    pass  # partial: record what was filled, continue after it
                elif exc.errno == errno.EEXIST:
                    states[pos] = PRESENT if states[pos] != REMOVED else states[pos]
                    client.metrics.eexist += 1
                    if pos == fault_page:
                        fault_done = True
                        ioctls.wake(fd, dst, ps)
                    pos += 1
                    continue
                elif exc.errno == errno.EAGAIN:
                    if pos > fault_page or fault_done:
                        return filled  # the faulting page is in; the rest can wait
                    return None
                elif exc.errno == errno.ESRCH:
                    raise ClientGone("ESRCH") from None
                else:
                    raise
            pages = n // ps
            states[pos : pos + pages] = bytes([new_state]) * pages
            if not zero and client.recorder is not None:
                client.recorder.add(region.offset + pos * ps, pages * ps)
            if pos <= fault_page < pos + pages:
                fault_done = True
            filled += pages * ps
            pos += pages
        return filled

    def _end_client(self, client: Client, reason: str) -> None:
        if client.closed:
            return
        with client.lock:  # never close a uffd under a running prefetch batch
            client.closed = True
            for fd in (client.uffd, client.pidfd):
                if fd is not None:
                    self._unwatch(fd)
            if client.conn is not None:
                self._unwatch(client.conn.fileno())
                client.conn.close()
                client.conn = None
            _close(client.uffd)
            if client.pidfd is not None:
                _close(client.pidfd)
        m = client.metrics
        m.ended = time.time()
        if m.state == "serving":
            m.state = "exited"
        if m.prefetch in ("running", "queued"):
            m.prefetch = "cancelled"
        self._clients.pop(client.key, None)
        self._ended.append(m)
        self.note("client-end", client=client.key, pid=m.pid, reason=reason)
        _log.info(
            "client %s ended (%s): %d faults, %d MiB copied, %d MiB zero pages, %d MiB prefetched, p99 %.0f us",
            client.key, reason, m.faults, m.bytes_copied >> 20, m.zero_bytes >> 20, m.prefetch_bytes >> 20,
            m.latency.percentile(0.99) / 1000,
        )
        if client is self._recording:
            self._finish_recording()

    # --- working set ------------------------------------------------------------------------------

    def _start_prefetch_or_record(self, client: Client) -> None:
        if self._ws is None and self._recording is None:
            client.recorder = workingset.Recorder()
            client.metrics.prefetch = "recording"
            self._recording = client
            _log.info("client %s: recording the working set to %s", client.key, self.ws_path)
            return
        if not self._ws:
            return
        segments = _segments_for(client.regions, self._ws)
        if not segments:
            return
        client.metrics.prefetch = "running"
        job = _PrefetchJob(client, segments, time.monotonic())
        with self._prefetch_cv:
            self._prefetch_jobs.append(job)
            self._prefetch_cv.notify()

    def _save_recording(self, client: Client | None = None) -> None:
        client = client or self._recording
        if client is None or client.recorder is None or not client.recorder.dirty:
            return
        client.recorder.dirty = False
        runs = client.recorder.snapshot()
        try:
            workingset.save(self.ws_path, self.mem_file, runs)
        except OSError as exc:
            _log.warning("cannot write working set %s: %s", self.ws_path, exc)

    def _finish_recording(self) -> None:
        client = self._recording
        self._recording = None
        if client is None or client.recorder is None:
            return
        self._save_recording(client)
        runs = client.recorder.snapshot()
        if runs:
            self._ws = runs
            client.metrics.prefetch = "recorded"
            _log.info("working set recorded: %d MiB in %d runs", workingset.total(runs) >> 20, len(runs))

    # --- prefetch ---------------------------------------------------------------------------------

    def _prefetch_worker(self) -> None:
        copier = ioctls.Copier()
        while not self._done.is_set():
            with self._prefetch_cv:
                while not self._prefetch_jobs and not self._done.is_set():
                    self._prefetch_cv.wait(1.0)
                if self._done.is_set():
                    return
                job = self._prefetch_jobs.popleft()
            try:
                finished = self._prefetch_batch(job, copier)
            except Exception as exc:
                _log.error("prefetch for client %s failed: %s", job.client.key, exc)
                job.client.metrics.prefetch = "cancelled"
                finished = True
            if finished:
                m = job.client.metrics
                m.prefetch_seconds = time.monotonic() - job.started
                if m.prefetch == "running":
                    m.prefetch = "done"
                    _log.info(
                        "client %s: prefetched %d MiB in %.3f s", job.client.key, m.prefetch_bytes >> 20,
                        m.prefetch_seconds,
                    )
                continue
            with self._prefetch_cv:
                self._prefetch_jobs.append(job)  # round robin between clients

    def _prefetch_batch(self, job: _PrefetchJob, copier: ioctls.Copier) -> bool:
        """Copy up to one batch of the job's missing pages. True when the job is finished."""
        client = job.client
        budget = self.config.prefetch_batch
        with client.lock:
            if client.closed:
                return True
            while job.index < len(job.segments) and budget > 0:
                seg = job.segments[job.index]
                region = client.regions[seg.region_index]
                states = client.states[seg.region_index]
                ps = region.page_size
                limit = min(seg.hi, seg.lo + max(1, budget // ps))
                match = _MISSING_RUN.search(states, seg.lo, limit)
                if match is None:
                    seg.lo = limit
                else:
                    lo, hi = match.start(), match.end()
                    try:
                        n = copier.copy(client.uffd, region.base + lo * ps,
                                        self.src_base + region.offset + lo * ps, (hi - lo) * ps)
                    except ioctls.UffdError as exc:
                        n = exc.done
                        if not n:
                            if exc.errno == errno.EEXIST:
                                states[lo] = PRESENT
                                seg.lo = lo + 1
                                continue
                            if exc.errno == errno.EAGAIN:
                                break  # a REMOVE is in flight: let the loop read it, retry later
                            if exc.errno == errno.ESRCH:
                                return True
                            raise
                    pages = n // ps
                    states[lo : lo + pages] = b"\x01" * pages
                    client.metrics.prefetch_bytes += pages * ps
                    client.metrics.prefetch_batches += 1
                    budget -= pages * ps
                    seg.lo = lo + pages
                if seg.lo >= seg.hi:
                    job.index += 1
            done = job.index >= len(job.segments)
        if not done and budget > 0:
            time.sleep(0.0005)  # EAGAIN: give the loop time to drain the REMOVE
        return done

    # --- metrics ----------------------------------------------------------------------------------

    def _metrics_worker(self) -> None:
        last_save = time.monotonic()
        while not self._done.wait(self.config.metrics_interval):
            self._publish()
            if time.monotonic() - last_save > 5:
                last_save = time.monotonic()
                self._save_recording()

    def _publish(self) -> None:
        if self.config.publish is None:
            return
        try:
            self.config.publish(self.metrics())
        except Exception as exc:
            _log.warning("publishing metrics failed: %s", exc)


@dataclass
class _PrefetchJob:
    client: Client
    segments: list[_Segment]
    started: float
    index: int = 0


def _segments_for(regions: list[Region], runs: list[workingset.Run]) -> list[_Segment]:
    """Map working-set file ranges onto a client's regions, in recorded order."""
    by_offset = sorted(range(len(regions)), key=lambda i: regions[i].offset)
    offsets = [regions[i].offset for i in by_offset]
    segments: list[_Segment] = []
    for offset, length in runs:
        end = offset + length
        pos = offset
        while pos < end:
            k = bisect.bisect_right(offsets, pos) - 1
            if k < 0:
                break
            ri = by_offset[k]
            region = regions[ri]
            r_end = region.offset + region.size
            if pos >= r_end:
                break
            stop = min(end, r_end)
            ps = region.page_size
            lo = (pos - region.offset) // ps
            hi = -(-(stop - region.offset) // ps)
            segments.append(_Segment(ri, lo, hi))
            pos = stop
    return segments


def _pidfd(pid: int) -> int | None:
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def parse_size(text: str) -> int:
    """'64K', '1M', '4096' -> bytes (binary units)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise ValueError(f"not a size: {text!r} (use e.g. 4K, 64K, 1M)")
    return int(match.group(1)) * units[match.group(2).upper()]
