"""The fuse-pipe host server: sessions, streams, dispatch.

A session is one guest mount: its inode table, open handles and reply cache. It outlives its stream, so a
client that reconnects (channel reset, snapshot restore) with the same session id carries on; requests it
re-sends are answered from the reply cache (already executed) or by the still-running request, never
executed twice. A new stream for a session replaces (closes) the one it had.

Requests are executed inline on the stream's reader thread (no thread hand-off for the common, fast
operations; replies to one read batch go out in one send) except those that can block for long (fsync,
fallocate, copy_file_range, syncfs, locks), which run in a thread pool, and lock waits, which get a thread
each. An FSYNC of an open handle goes to the session's sync groups (syncgroup), which sync it in the pool,
alone or with others'.

The guest is not trusted to be reasonable either: everything it can make the server hold is bounded. Per
server: `max_sessions` sessions (a new one first evicts the longest-detached session; with none detached
its HELLO is refused with HELLO_BUSY, and the client retries), `max_connections` streams (more are closed at
once), one inotify instance (`inval.InotifyHub`), `workers` pool threads with at most 4x as many pooled
requests queued (then the reader stops reading: backpressure), `max_lock_waits` waiting lock requests (more
are answered ENOLCK). A stream that has not sent its whole HELLO within `hello_timeout` seconds is closed.
Per session, the reply cache holds at most _CACHE_ENTRIES replies and _CACHE_BYTES bytes; replies to
requests that are harmless to run twice (reads, READDIR, RELEASE, FSYNC: _NOT_CACHED) are never cached; its
sync groups hold at most 64 FSYNCs each (a group's sync takes one pool request) and two AIO contexts (see
syncgroup). See fs for what a request may do on the host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from fcvm.core import log
from fcvm.fusepipe.fs import Filesystem
from fcvm.fusepipe.inval import InotifyHub, Invalidator
from fcvm.fusepipe.syncgroup import SyncGroups
from fcvm_wire.fusepipe import proto

_log = log.get("fusepipe")

_POOLED = frozenset({proto.FSYNC, proto.FSYNCDIR, proto.FALLOCATE, proto.COPY_FILE_RANGE, proto.SYNCFS,
                     proto.GETLK, proto.SETLK})
_OWN_THREAD = frozenset({proto.SETLKW})  # may wait indefinitely: never tie up a pool worker
# Requests that are harmless to run twice (a re-sent RELEASE finds its handle gone: handles are never reused).
_NOT_CACHED = frozenset({proto.READ, proto.READDIR, proto.GETATTR, proto.READLINK, proto.STATFS, proto.GETXATTR,
                         proto.LISTXATTR, proto.LSEEK, proto.RELEASE, proto.RELEASEDIR, proto.FSYNC,
                         proto.FSYNCDIR})
_CACHE_ENTRIES = 4096
_CACHE_BYTES = 4 << 20
_POOL_QUEUE_PER_WORKER = 4
_FD_TABLE_MAX = 1 << 16
_RECV_BUFFER = 2 * proto.MAX_FRAME  # always room for one whole request after a partial one


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True

    def send(self, data: bytes) -> bool:
        with self.lock:
            if not self.alive:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self._end()
                return False

    def close(self) -> None:
        """End the stream: its reader sees EOF."""
        with self.lock:
            self._end()

    def _end(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ReplyCache:
    """Replies by request unique, for requests a reconnecting client re-sends; oldest dropped first, bounded in
    count and in bytes."""

    def __init__(self, max_entries: int = _CACHE_ENTRIES, max_bytes: int = _CACHE_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.replies: OrderedDict[int, bytes] = OrderedDict()
        self.size = 0

    def get(self, unique: int) -> bytes | None:
        return self.replies.get(unique)

    def put(self, unique: int, reply: bytes) -> None:
        old = self.replies.pop(unique, None)
        if old is not None:
            self.size -= len(old)
        self.replies[unique] = reply
        self.size += len(reply)
        while len(self.replies) > self.max_entries or self.size > self.max_bytes:
            _, dropped = self.replies.popitem(last=False)
            self.size -= len(dropped)


class Workers:
    """The threads a server's sessions share for requests that leave the reader thread, each kind bounded."""

    def __init__(self, threads: int, lock_waits: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fp-work")
        self.pool_slots = threading.Semaphore(threads * _POOL_QUEUE_PER_WORKER)  # queued + running
        self.lock_waits = threading.BoundedSemaphore(lock_waits)

    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` in the pool; blocks while the pool's queue is full (the caller stops reading its
        stream: backpressure, since a pooled request never waits for another request)."""
        self.pool_slots.acquire()
        try:
            future: Future[None] = self.pool.submit(work)
        except RuntimeError:  # the server is closing: the request goes with its session
            self.pool_slots.release()
            return
        future.add_done_callback(lambda _: self.pool_slots.release())  # also when cancelled at shutdown

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Session:
    def __init__(self, session_id: int, root: str, read_only: bool, workers: Workers,
                 hub: InotifyHub | None = None, **timeouts: float) -> None:
        self.id = session_id
        self.fs = Filesystem(root, read_only=read_only, **timeouts)
        self.workers = workers
        self.conn: Connection | None = None
        self.lock = threading.Lock()
        self.pending: set[int] = set()
        self.cache = ReplyCache()
        self.detached_at: float | None = None
        self.closed = False
        self.invalidator = (Invalidator(hub, self.fs.inodes, self.notify, lambda: self.fs.expire_only)
                            if hub is not None else None)
        self.fs.invalidator = self.invalidator
        self.syncs = SyncGroups[tuple[proto.InHeader, int]](workers.submit, self._synced)  # token: request, fd

    def attach(self, conn: Connection) -> None:
        with self.lock:
            previous, self.conn = self.conn, conn
            self.detached_at = None
        if previous is not None:  # the client reconnected: its old stream is dead to it
            previous.close()

    def detach(self, conn: Connection) -> None:
        with self.lock:
            if self.conn is conn:
                self.conn = None
                self.detached_at = time.monotonic()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            conn = self.conn
        if conn is not None:  # its reader stops
            conn.close()
        if self.invalidator is not None:
            self.invalidator.close()
        self.syncs.close()
        self.fs.close()

    def send(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.send(data)

    def notify(self, msg: bytes) -> None:
        if self.fs.initialized:
            self.send(msg)

    def process(self, msg: bytes, batch: list[bytes]) -> None:
        """Handle one request; inline replies are appended to `batch`."""
        try:
            h = proto.parse_in_header(msg)
        except proto.FrameError:
            return
        opcode = h.opcode
        if opcode not in proto.NO_REPLY:
            unique = h.unique
            with self.lock:
                if unique in self.pending:
                    return  # re-sent while still running: its reply goes to the current stream
                cached = self.cache.get(unique)
                if cached is not None:
                    batch.append(cached)
                    return
                self.pending.add(unique)
        if opcode == proto.FSYNC:
            target = self.fs.fsync_target(msg)
            if target is not None:
                fd, datasync = target
                self.syncs.fsync(fd, h.pid, datasync, (h, fd))
                return
        if opcode in _POOLED:
            self.workers.submit(lambda: self._run_async(h, msg))
            return
        if opcode in _OWN_THREAD:
            if self.workers.lock_waits.acquire(blocking=False):
                self.fs.accept_interrupts(h.unique)
                threading.Thread(target=self._wait_for_lock, args=(h, msg), name="fp-lockwait",
                                 daemon=True).start()
                return
            refused = proto.pack_reply(h.unique, -errno.ENOLCK)  # too many lock waits already
            self._finish(h, refused)
            batch.append(refused)
            return
        reply = self.fs.dispatch(h, msg)
        hints = self.fs.hints
        if hints:  # ahead of the reply, never in the reply cache: a re-sent request gets none
            batch.extend(hints)
            hints.clear()
        if reply is not None:
            self._finish(h, reply)
            batch.append(reply)
        elif opcode not in proto.NO_REPLY:
            self._finish(h, None)
        if opcode == proto.DESTROY:
            self.fs.initialized = False

    def _finish(self, h: proto.InHeader, reply: bytes | None) -> None:
        with self.lock:
            if reply is not None and h.opcode not in _NOT_CACHED:
                self.cache.put(h.unique, reply)
            self.pending.discard(h.unique)

    def _synced(self, results: list[tuple[tuple[proto.InHeader, int], int]]) -> None:
        """FSYNCs the sync groups did together: their replies in one send, then their fds closed (see
        Filesystem.fsync_target)."""
        replies = []
        for (h, _), error in results:
            reply = proto.pack_reply(h.unique, -error)
            self._finish(h, reply)
            replies.append(reply)
        self.send(b"".join(replies))
        for (_, fd), _ in results:
            os.close(fd)

    def _run_async(self, h: proto.InHeader, msg: bytes) -> None:
        reply = self.fs.dispatch(h, msg)
        self._finish(h, reply)
        if reply is not None:
            self.send(reply)

    def _wait_for_lock(self, h: proto.InHeader, msg: bytes) -> None:
        try:
            self._run_async(h, msg)
        finally:
            self.workers.lock_waits.release()


def _grow_fd_table() -> None:
    """Size the process's fd table for as many fds as it may open (up to _FD_TABLE_MAX) now, in one step.

    The server holds an O_PATH fd per inode the guest knows. The kernel grows a full fd table by doubling it,
    and in a process with threads each growth waits for an RCU grace period: about 8 ms here (nested
    virtualisation). A guest reading its first thousand files made the server grow its table five times, 40 of
    the 85 ms the whole read took (bench/fusepipe.py). Done once here, it costs at most one wait; the table
    stays (512 KiB at _FD_TABLE_MAX)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # F_DUPFD takes the lowest free fd at or above the one asked for: an open fd is never replaced.
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, min(soft, _FD_TABLE_MAX) - 1))
    except OSError:  # no free fd that high: the table is that large already
        pass
    finally:
        os.close(fd)


class Server:
    """Serves one host directory to a bounded number of sessions (guest mounts)."""

    def __init__(self, root: str, *, read_only: bool = False, resume_grace: float = 300.0,
                 watch: bool = True, workers: int = 32, max_sessions: int = 8, max_connections: int = 16,
                 max_lock_waits: int = 64, hello_timeout: float = 10.0, **timeouts: float) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"{root} is not a directory")
        self.read_only = read_only
        self.resume_grace = resume_grace
        self.max_sessions = max_sessions
        self.max_connections = max_connections
        self.max_lock_waits = max_lock_waits
        self.hello_timeout = hello_timeout
        # FCVM_FUSEPIPE_TIMEOUT=<seconds> overrides the entry/attr cache timeouts (0: no caching; bench).
        env = os.environ.get("FCVM_FUSEPIPE_TIMEOUT")
        if env is not None and not timeouts:
            t = float(env)
            timeouts = {"entry_timeout": t, "attr_timeout": t, "negative_timeout": t}
        self.timeouts = timeouts
        _grow_fd_table()
        self.workers = Workers(workers, max_lock_waits)
        self.hub: InotifyHub | None = None
        if watch:
            self.hub = InotifyHub()
            self.hub.start()
        self.sessions: dict[int, Session] = {}
        self.connections = 0  # streams being served by serve_forever
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def _session(self, sid: int) -> tuple[Session, bool] | None:
        """The session `sid` names and whether it existed; None if there is no room for a new one."""
        with self.lock:
            self._reap()
            session = self.sessions.get(sid)
            if session is not None and not session.closed:
                return session, True
            if len(self.sessions) >= self.max_sessions and not self._evict_one():
                return None
            session = Session(sid, self.root, self.read_only, self.workers, self.hub, **self.timeouts)
            self.sessions[sid] = session
            return session, False

    def _reap(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s.closed or (s.detached_at is not None and now - s.detached_at > self.resume_grace):
                del self.sessions[sid]
                s.close()

    def _evict_one(self) -> bool:
        """Close the session detached the longest (caller holds self.lock); False if every one has a stream."""
        detached = [(s.detached_at, sid) for sid, s in self.sessions.items()
                    if s.conn is None and s.detached_at is not None]
        if not detached:
            return False
        _, sid = min(detached)
        _log.info("fuse-pipe: %d sessions; closing detached session %x for a new one", len(self.sessions), sid)
        self.sessions.pop(sid).close()
        return True

    def _handshake(self, sock: socket.socket) -> tuple[Session, bool] | None:
        """Read HELLO (within hello_timeout) and answer it; the session, or None if the stream is refused."""
        deadline = time.monotonic() + self.hello_timeout
        magic, sid, flags, _ = proto.HELLO.unpack(_recv_exact(sock, proto.HELLO.size, deadline))
        if magic != proto.MAGIC:
            _log.warning("fuse-pipe: client sent a bad HELLO; closing")
            return None
        found = self._session(sid)
        if found is None:
            _log.warning("fuse-pipe: %d sessions with a stream each already; refusing session %x",
                         self.max_sessions, sid)
            sock.sendall(proto.HELLO_OK.pack(proto.MAGIC, proto.HELLO_BUSY, 0))
            return None
        session, resumed = found
        session.fs.hints_wanted = bool(flags & proto.HELLO_FLAG_HINTS)
        if not resumed and flags & proto.HELLO_FLAG_INITIALIZED:
            # A restored guest's mount: its node ids belong to the source's server and answer ESTALE here, which
            # makes the guest kernel look the paths up again; the root (node 1) is the same directory.
            session.fs.adopt()
        try:
            sock.sendall(proto.HELLO_OK.pack(proto.MAGIC, proto.HELLO_STATUS_OK, int(resumed)))
        except OSError:
            if not resumed:  # no stream will ever attach to it: give its place back
                self._drop_unattached(session)
            raise
        sock.settimeout(None)
        _log.debug("fuse-pipe: session %x %s (flags %#x)", sid, "resumed" if resumed else "new", flags)
        return found

    def serve_connection(self, sock: socket.socket, *, close_session_on_eof: bool = False) -> None:
        """Serve one stream until it ends. Blocking."""
        try:
            found = self._handshake(sock)
        except (OSError, ConnectionError) as exc:  # a timeout too
            _log.debug("fuse-pipe: handshake failed: %s", exc)
            found = None
        if found is None:
            sock.close()
            return
        session, resumed = found
        conn = Connection(sock)
        session.attach(conn)
        try:
            self._read_loop(sock, session)
        finally:
            session.detach(conn)
            conn.alive = False
            sock.close()
            if close_session_on_eof or session.closed or (not session.fs.initialized and resumed is False):
                self._drop_unattached(session)

    def _drop_unattached(self, session: Session) -> None:
        """Close `session` unless a stream (a reconnect) has attached to it meanwhile."""
        with self.lock:
            if self.sessions.get(session.id) is session and session.conn is None:
                del self.sessions[session.id]
                session.close()

    def _read_loop(self, sock: socket.socket, session: Session) -> None:
        # Requests are parsed in place in one preallocated buffer (no per-recv allocation); the replies to
        # everything one recv brought go out in one send.
        buf = bytearray(_RECV_BUFFER)
        view = memoryview(buf)
        unpack_from = struct.unpack_from
        process = session.process
        start = end = 0
        make_room = proto.make_room
        while True:
            start, end = make_room(view, start, end)
            try:
                n = sock.recv_into(view[end:])
            except OSError:
                return
            if not n:
                return
            end += n
            batch: list[bytes] = []
            while end - start >= 4:
                (length,) = unpack_from("<I", buf, start)
                if length < proto.MIN_REQUEST or length > proto.MAX_FRAME:
                    if batch:
                        session.send(b"".join(batch))
                    _log.warning("fuse-pipe: malformed frame from client (bad message length %d); "
                                 "dropping the stream", length)
                    _reply_bad_frame(sock, buf[start:end])
                    return
                if end - start < length:
                    break
                process(bytes(view[start:start + length]), batch)
                start += length
            if start == end:
                start = end = 0
            if batch:
                session.send(batch[0] if len(batch) == 1 else b"".join(batch))

    def serve_forever(self, listener: socket.socket) -> None:
        """Accept streams on a listening socket, one thread each, until `stop()`."""
        listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                with self.lock:
                    self._reap()
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            with self.lock:
                room = self.connections < self.max_connections
                if room:
                    self.connections += 1
            if not room:
                _log.debug("fuse-pipe: %d streams already; closing a new one", self.max_connections)
                sock.close()
                continue
            sock.settimeout(None)
            threading.Thread(target=self._serve_counted, args=(sock,), name="fp-conn", daemon=True).start()

    def _serve_counted(self, sock: socket.socket) -> None:
        try:
            self.serve_connection(sock)
        finally:
            with self.lock:
                self.connections -= 1

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.stop()
        with self.lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for s in sessions:
            s.close()
        if self.hub is not None:
            self.hub.close()
        self.workers.shutdown()


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = b""
    while len(buf) < n:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("stream closed")
        buf += chunk
    return buf


def _reply_bad_frame(sock: socket.socket, buf: bytearray) -> None:
    """Answer the request whose frame is malformed (if its unique is readable) before dropping."""
    if len(buf) >= 16:
        (unique,) = struct.unpack_from("<Q", buf, 8)
        with contextlib.suppress(OSError):
            sock.sendall(proto.pack_reply(unique, -errno.EPROTO))


def serve(root: str, sock: socket.socket, *, read_only: bool = False, **kwargs: float) -> None:
    """Serve `root` on `sock`: a listening socket (accept loop) or one connected stream. Blocking."""
    server = Server(root, read_only=read_only, **kwargs)  # type: ignore[arg-type]
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            server.serve_forever(sock)
        else:
            server.serve_connection(sock, close_session_on_eof=True)
    finally:
        server.close()
