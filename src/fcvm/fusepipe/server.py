"""The fuse-pipe host server: sessions, streams, dispatch.

A session is one guest mount: its inode table, open handles and reply cache. It outlives its stream, so a
client that reconnects (channel reset, snapshot restore) with the same session id carries on; requests it
re-sends are answered from the reply cache (already executed) or by the still-running request, never
executed twice.

Requests are executed inline on the stream's reader thread (no thread hand-off for the common, fast
operations; replies to one read batch go out in one send) except those that can block for long (fsync,
lock waits, fallocate, copy_file_range, syncfs), which run in a thread pool.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from fcvm.core import log
from fcvm.fusepipe.fs import Filesystem
from fcvm.fusepipe.inval import Invalidator
from fcvm_wire.fusepipe import proto

_log = log.get("fusepipe")

_POOLED = frozenset({proto.FSYNC, proto.FSYNCDIR, proto.FALLOCATE, proto.COPY_FILE_RANGE, proto.SYNCFS,
                     proto.GETLK, proto.SETLK})
_OWN_THREAD = frozenset({proto.SETLKW})  # may wait indefinitely: never tie up a pool worker
_NOT_CACHED = frozenset({proto.READ, proto.GETATTR, proto.READLINK, proto.STATFS, proto.GETXATTR,
                         proto.LISTXATTR, proto.LSEEK})
_CACHE_ENTRIES = 4096
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
                self.alive = False
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                return False


class Session:
    def __init__(self, session_id: int, root: str, read_only: bool, pool: ThreadPoolExecutor,
                 watch: bool = True, **timeouts: float) -> None:
        self.id = session_id
        self.fs = Filesystem(root, read_only=read_only, **timeouts)
        self.pool = pool
        self.conn: Connection | None = None
        self.lock = threading.Lock()
        self.pending: set[int] = set()
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.detached_at: float | None = None
        self.closed = False
        self.invalidator = (Invalidator(self.fs.inodes, self.notify, lambda: self.fs.expire_only)
                            if watch else None)
        self.fs.invalidator = self.invalidator

    def attach(self, conn: Connection) -> None:
        with self.lock:
            self.conn = conn
            self.detached_at = None

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
        if self.invalidator is not None:
            self.invalidator.close()
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
        if opcode in _POOLED:
            self.pool.submit(self._run_async, h, msg)
            return
        if opcode in _OWN_THREAD:
            threading.Thread(target=self._run_async, args=(h, msg), daemon=True).start()
            return
        reply = self.fs.dispatch(h, msg)
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
                cache = self.cache
                cache[h.unique] = reply
                if len(cache) > _CACHE_ENTRIES:
                    cache.popitem(last=False)
            self.pending.discard(h.unique)

    def _run_async(self, h: proto.InHeader, msg: bytes) -> None:
        reply = self.fs.dispatch(h, msg)
        self._finish(h, reply)
        if reply is not None:
            self.send(reply)


class Server:
    """Serves one host directory to any number of sessions (guest mounts)."""

    def __init__(self, root: str, *, read_only: bool = False, resume_grace: float = 300.0,
                 watch: bool = True, workers: int = 32, **timeouts: float) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"{root} is not a directory")
        self.read_only = read_only
        self.resume_grace = resume_grace
        self.watch = watch
        # FCVM_FUSEPIPE_TIMEOUT=<seconds> overrides the entry/attr cache timeouts (0: no caching; bench).
        env = os.environ.get("FCVM_FUSEPIPE_TIMEOUT")
        if env is not None and not timeouts:
            t = float(env)
            timeouts = {"entry_timeout": t, "attr_timeout": t, "negative_timeout": t}
        self.timeouts = timeouts
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fp-work")
        self.sessions: dict[int, Session] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def _session(self, sid: int) -> tuple[Session, bool]:
        with self.lock:
            self._reap()
            session = self.sessions.get(sid)
            if session is not None and not session.closed:
                return session, True
            session = Session(sid, self.root, self.read_only, self.pool, self.watch, **self.timeouts)
            self.sessions[sid] = session
            return session, False

    def _reap(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s.closed or (s.detached_at is not None and now - s.detached_at > self.resume_grace):
                del self.sessions[sid]
                s.close()

    def serve_connection(self, sock: socket.socket, *, close_session_on_eof: bool = False) -> None:
        """Serve one stream until it ends. Blocking."""
        try:
            hello = _recv_exact(sock, proto.HELLO.size)
            magic, sid, flags, _ = proto.HELLO.unpack(hello)
            if magic != proto.MAGIC:
                _log.warning("fuse-pipe: client sent a bad HELLO; closing")
                return
            session, resumed = self._session(sid)
            sock.sendall(proto.HELLO_OK.pack(proto.MAGIC, 0, int(resumed)))
        except (OSError, ConnectionError) as exc:
            _log.debug("fuse-pipe: handshake failed: %s", exc)
            sock.close()
            return
        _log.debug("fuse-pipe: session %x %s (flags %#x)", sid, "resumed" if resumed else "new", flags)
        conn = Connection(sock)
        session.attach(conn)
        try:
            self._read_loop(sock, session)
        finally:
            session.detach(conn)
            conn.alive = False
            sock.close()
            if close_session_on_eof or session.closed or (not session.fs.initialized and resumed is False):
                with self.lock:
                    if self.sessions.get(sid) is session and session.conn is None:
                        del self.sessions[sid]
                        session.close()

    def _read_loop(self, sock: socket.socket, session: Session) -> None:
        # Requests are parsed in place in one preallocated buffer (no per-recv allocation); the replies to
        # everything one recv brought go out in one send.
        buf = bytearray(_RECV_BUFFER)
        view = memoryview(buf)
        unpack_from = struct.unpack_from
        process = session.process
        start = end = 0
        while True:
            if end == len(buf):  # a partial message sits at the end: move it to the front
                view[:end - start] = view[start:end]
                end -= start
                start = 0
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
            sock.settimeout(None)
            threading.Thread(target=self.serve_connection, args=(sock,), name="fp-conn", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.stop()
        with self.lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for s in sessions:
            s.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("stream closed")
        buf += chunk
    return buf


def _reply_bad_frame(sock: socket.socket, buf: bytearray) -> None:
    """Answer the request whose frame is malformed (if its unique is readable) before dropping."""
    import errno
    import struct

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
