"""A stream multiplexer over one byte pipe (the QEMU virtio-serial port), standard library only.

Both ends run the same engine (`MuxEngine`): the host bridge (`fcvm.channel`) and the guest agent
(`fc_agent.channel`). Every stream is backed by a real local socket; the engine pumps bytes between that
socket and the pipe.

Frames: a 9-byte header `>BII` (kind, stream id, payload length) and the payload.
  PAD           a single 0x00 byte between frames, skipped (used as a re-synchronisation preamble)
  HELLO         stream 0: magic, version, role, flags (READY), this end's session id, the peer session
                id it has seen
  OPEN          port u32, receive window u32 (the opener's)
  OPEN_OK       receive window u32 (the acceptor's)
  OPEN_REFUSED  errno u32 (nothing listens, too many connections)
  DATA          up to MAX_PAYLOAD bytes, never more than the credit the receiver granted
  EOF           the sender will send no more on this stream (shutdown(SHUT_WR))
  RESET         abrupt close; no reply
  WINDOW        credit u32: the receiver consumed that many more bytes
Host-opened streams have odd ids, guest-opened streams even ids.

Sessions: each end picks a random session id whenever it (re)attaches to the pipe. An end is ready once
the peer's HELLO acknowledges its session (seen == session); until then it repeats HELLO periodically and
discards every other frame. An end answers a HELLO that is from an unknown session, acknowledges the wrong
session, or comes from a peer that is not ready yet. A HELLO carrying an unknown session id means the peer
restarted: every stream of the old session is reset. Both decoders start out of
sync and discard bytes until a HELLO header; a frame that fails validation resets the whole session
(logged) and re-synchronises the same way. A new attachment sends a run of PAD bytes first, so that a
peer holding half a frame from the previous session completes it harmlessly.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import heapq
import itertools
import logging
import os
import re
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BII")
MAX_PAYLOAD = 64 * 1024
DEFAULT_WINDOW = 256 * 1024
ROLE_HOST = 1
ROLE_GUEST = 2

# Built at import time so that the source text (which may itself travel through the mux) does not
# contain the byte sequence the decoders resynchronise on.
_MAGIC = bytes(b ^ 0x5A for b in b"<9,7w7/\"")
_HELLO_BODY = struct.Struct(">8sHBBQQ")
_FLAG_READY = 1
_U32 = struct.Struct(">I")
_OPEN_BODY = struct.Struct(">II")


class Kind(enum.IntEnum):
    PAD = 0
    HELLO = 1
    OPEN = 2
    OPEN_OK = 3
    OPEN_REFUSED = 4
    DATA = 5
    EOF = 6
    RESET = 7
    WINDOW = 8


# Exact payload length per kind; DATA is variable (checked against MAX_PAYLOAD).
_FIXED_LEN = {
    Kind.HELLO: _HELLO_BODY.size,
    Kind.OPEN: _OPEN_BODY.size,
    Kind.OPEN_OK: 4,
    Kind.OPEN_REFUSED: 4,
    Kind.EOF: 0,
    Kind.RESET: 0,
    Kind.WINDOW: 4,
}
_KINDS = frozenset(int(k) for k in Kind if k != Kind.PAD)
HELLO_SIGNATURE = HEADER.pack(Kind.HELLO, 0, _HELLO_BODY.size) + _MAGIC
# Enough zeros to complete any partial frame (header included) the peer may still hold.
PREAMBLE = bytes(2 * (HEADER.size + MAX_PAYLOAD))
_NONZERO = re.compile(rb"[^\x00]")


class Frame(NamedTuple):
    kind: int
    stream: int
    payload: bytes = b""


class Hello(NamedTuple):
    version: int
    role: int
    session: int
    seen: int
    ready: bool


class ProtocolError(Exception):
    """A malformed frame. The decoder drops out of sync; the engine resets the session."""


def encode(kind: int, stream: int, payload: bytes = b"") -> bytes:
    if kind not in _KINDS:
        raise ValueError(f"unknown frame kind {kind}")
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream id out of range: {stream}")
    expected = _FIXED_LEN.get(Kind(kind))
    if expected is not None and len(payload) != expected:
        raise ValueError(f"{Kind(kind).name} payload must be {expected} bytes, not {len(payload)}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, stream, len(payload)) + payload


def encode_hello(
    role: int, session: int, seen: int, *, ready: bool = False, version: int = PROTOCOL_VERSION
) -> bytes:
    flags = _FLAG_READY if ready else 0
    return encode(Kind.HELLO, 0, _HELLO_BODY.pack(_MAGIC, version, role, flags, session, seen))


def parse_hello(payload: bytes) -> Hello:
    magic, version, role, flags, session, seen = _HELLO_BODY.unpack(payload)
    if magic != _MAGIC:
        raise ProtocolError("HELLO with a bad magic")
    return Hello(version, role, session, seen, bool(flags & _FLAG_READY))


def encode_open(stream: int, port: int, window: int) -> bytes:
    return encode(Kind.OPEN, stream, _OPEN_BODY.pack(port, window))


def encode_u32(kind: int, stream: int, value: int) -> bytes:
    return encode(kind, stream, _U32.pack(value))


def u32(payload: bytes) -> int:
    return int(_U32.unpack(payload)[0])


def parse_open(payload: bytes) -> tuple[int, int]:
    port, window = _OPEN_BODY.unpack(payload)
    return int(port), int(window)


class FrameDecoder:
    """Incremental decoder. `feed()` never raises on bad input: errors come back in the result list as
    ProtocolError instances, after which the decoder skips bytes until the next HELLO signature.
    Buffered input stays below one frame plus one fed chunk."""

    def __init__(self, *, synced: bool = False) -> None:
        self.synced = synced
        self._buf = b""
        # Input arriving in small reads (the guest's virtio-serial port returns a few KiB per read) is
        # collected here and joined once the pending frame is complete, not re-copied per read.
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0

    def resync(self) -> None:
        """Drop everything up to the next HELLO (after a session reset)."""
        self.synced = False

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._have

    def feed(self, data: bytes) -> list[Frame | ProtocolError]:
        if self._buf and self._have + len(data) + len(self._buf) < self._need:
            self._parts.append(bytes(data))
            self._have += len(data)
            return []
        if self._parts:
            buf = b"".join([self._buf, *self._parts, data])
            self._parts.clear()
            self._have = 0
        else:
            buf = self._buf + data if self._buf else bytes(data)
        out: list[Frame | ProtocolError] = []
        end = len(buf)
        pos = 0
        header_size = HEADER.size
        unpack = HEADER.unpack_from
        while pos < end:
            if not self.synced:
                found = buf.find(HELLO_SIGNATURE, pos)
                if found < 0:
                    pos = max(pos, end - (len(HELLO_SIGNATURE) - 1))
                    break
                pos = found
                self.synced = True
            if buf[pos] == 0:
                match = _NONZERO.search(buf, pos)
                if match is None:
                    pos = end
                    break
                pos = match.start()
            if end - pos < header_size:
                break
            kind, stream, length = unpack(buf, pos)
            problem = self._check(kind, stream, length)
            if problem:
                out.append(ProtocolError(problem))
                self.synced = False
                pos += 1
                continue
            start = pos + header_size
            if end - start < length:
                break
            payload = buf[start : start + length]
            if kind == Kind.HELLO and payload[:8] != _MAGIC:
                out.append(ProtocolError("HELLO with a bad magic"))
                self.synced = False
                pos += 1
                continue
            out.append(Frame(kind, stream, payload))
            pos = start + length
        self._buf = buf[pos:]
        self._need = 0
        if self.synced and len(self._buf) >= header_size and self._buf[0] != 0:
            kind, stream, length = unpack(self._buf, 0)
            if self._check(kind, stream, length) is None:
                self._need = header_size + length
        return out

    @staticmethod
    def _check(kind: int, stream: int, length: int) -> str | None:
        if kind not in _KINDS:
            return f"unknown frame kind {kind}"
        if kind == Kind.DATA:
            if length > MAX_PAYLOAD:
                return f"DATA frame of {length} bytes exceeds {MAX_PAYLOAD}"
        elif length != _FIXED_LEN[Kind(kind)]:
            return f"{Kind(kind).name} frame with a {length}-byte payload"
        if (stream == 0) != (kind == Kind.HELLO):
            return f"{Kind(kind).name} frame on stream {stream}"
        return None


# --- engine -----------------------------------------------------------------------------------------

OPENING, OPEN = 1, 2
_TX_HIGH = 2 * MAX_PAYLOAD  # stop reading local sockets while this much is queued for the pipe
_TX_LOW = MAX_PAYLOAD
_IOV_MAX = 512

# A result callback gets 0 on success or an errno.
OpenResult = Callable[[int], None]
# Called when the peer opens `port`: return the local socket to pump, or None to refuse.
OpenHandler = Callable[[int], "socket.socket | None"]


def _send_queued(queue: deque[bytes | memoryview], send: Callable[[list[bytes | memoryview]], int]) -> int:
    """Send from the front of `queue` with vectored writes until it is empty or the fd would block, dropping what
    was sent; returns how many bytes that was. A failed write raises OSError."""
    sent = 0
    while queue:
        try:
            written = send(list(itertools.islice(queue, _IOV_MAX)))
        except (BlockingIOError, InterruptedError):
            break
        sent += written
        while written:
            head = queue[0]
            if len(head) <= written:
                written -= len(head)
                queue.popleft()
            else:
                queue[0] = memoryview(head)[written:]
                written = 0
    return sent


class _Stream:
    __slots__ = (
        "credit", "events", "fd", "granted", "local_eof", "on_result", "out", "out_len", "peer_eof",
        "pending", "port", "shut", "sid", "sock", "state", "unacked",
    )

    def __init__(self, sid: int, port: int, sock: socket.socket, state: int) -> None:
        self.sid = sid
        self.port = port
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state
        self.credit = 0  # bytes we may still send to the peer
        self.granted = 0  # bytes the peer may still send to us
        self.unacked = 0  # bytes delivered locally, not yet returned as credit
        self.out: deque[bytes | memoryview] = deque()  # to be written to the local socket
        self.out_len = 0
        self.local_eof = False  # local socket read hit EOF; EOF frame queued
        self.peer_eof = False  # EOF frame received
        self.shut = False  # shutdown(SHUT_WR) done on the local socket
        self.events = 0
        self.on_result: OpenResult | None = None
        self.pending = b""  # bytes to send once the stream is open


class _PendingOpen(NamedTuple):
    port: int
    sock: socket.socket
    on_result: OpenResult | None
    initial: bytes
    deadline: float


class MuxEngine:
    """One end of the mux, running a selectors loop in its own thread.

    Thread-safety: only `call_soon_threadsafe`, `stop`, `ready` (an Event) and the read-only properties may
    be used from other threads; everything else runs on the loop thread (use `call_soon_threadsafe`).
    """

    def __init__(
        self,
        role: int,
        *,
        on_open: OpenHandler,
        on_transport_lost: Callable[[], None] | None = None,
        logger: logging.Logger | None = None,
        window: int = DEFAULT_WINDOW,
        max_streams: int = 1 << 20,
        hello_interval: float = 0.25,
        open_timeout: float = 2.0,
        name: str = "mux",
    ) -> None:
        if role not in (ROLE_HOST, ROLE_GUEST):
            raise ValueError(f"bad role {role}")
        self.role = role
        self.name = name
        self.log = logger or logging.getLogger(f"fcvm_wire.mux.{name}")
        self.window = window
        self.max_streams = max_streams
        self.hello_interval = hello_interval
        self.open_timeout = open_timeout
        self._on_open = on_open
        self._on_transport_lost = on_transport_lost
        self.ready = threading.Event()
        self.sessions = 0  # how many sessions became ready (tests, status)
        self.streams: dict[int, _Stream] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._calls: deque[Callable[[], None]] = deque()
        self._calls_lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._readers: dict[int, Callable[[int], None]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        # transport
        self._tfd = -1
        self._tclose = False
        self._tevents = 0
        self._tx: deque[bytes | memoryview] = deque()
        self._tx_len = 0
        self._congested = False
        self._decoder = FrameDecoder()
        self._session = 0
        self._peer_session = 0
        self._peer_seen = 0
        self._peer_problem = ""
        self._attachment = 0
        self._pending_opens: list[_PendingOpen] = []
        self._next_sid = 1 if role == ROLE_HOST else 2
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # --- loop machinery ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mux-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, reset every stream, close every socket the engine owns."""
        self.call_soon_threadsafe(self._request_stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _request_stop(self) -> None:
        self._stopping = True

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with self._calls_lock:
            self._calls.append(fn)
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))

    def add_reader(self, sock: socket.socket, callback: Callable[[int], None]) -> None:
        """Watch an extra socket (the bridge's listener, CONNECT lines); callback(mask) runs on the loop."""
        fd = sock.fileno()
        self._readers[fd] = callback
        self._sel.register(fd, selectors.EVENT_READ, ("reader", fd))

    def remove_reader(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_r.recv(4096)
        with self._calls_lock:
            calls = list(self._calls)
            self._calls.clear()
            self._wake_pending = False
        for fn in calls:
            self._guard(fn)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            self.log.exception("%s: internal error in a callback", self.name)

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, mask in self._sel.select(timeout):
                    data = key.data
                    try:
                        if data == "wake":
                            self._on_wake(mask)
                        elif data == "transport":
                            self._on_transport(mask)
                        elif isinstance(data, _Stream):
                            if data.sid in self.streams and self.streams[data.sid] is data:
                                self._on_stream(data, mask)
                        else:
                            callback = self._readers.get(data[1])
                            if callback is not None:
                                callback(mask)
                    except Exception:
                        self.log.exception("%s: internal error handling an event", self.name)
                        if isinstance(data, _Stream):
                            self._reset_stream(data, notify_peer=True)
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, fn = heapq.heappop(self._timers)
                    self._guard(fn)
                self._flush_tx()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._drop_session("engine stopped", lost_transport=False)
        for pending in self._pending_opens:
            self._fail_pending(pending, errno.ECONNABORTED)
        self._pending_opens.clear()
        self._detach_transport()
        for fd in list(self._readers):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
        self._readers.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self.ready.clear()

    # --- transport --------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._tfd >= 0

    def attach_transport(self, fd: int, *, close_on_detach: bool = True) -> None:
        """Start a new session on `fd` (a connected socket or the virtio-serial device)."""
        if self._tfd >= 0:
            self._detach_transport()
        os.set_blocking(fd, False)
        self._tfd = fd
        self._tclose = close_on_detach
        self._decoder = FrameDecoder()
        self._new_session()
        self._tevents = selectors.EVENT_READ
        self._sel.register(fd, self._tevents, "transport")
        self._queue_tx(PREAMBLE)
        self._send_hello()
        self._attachment += 1
        attachment = self._attachment

        def tick() -> None:
            if self._tfd < 0 or attachment != self._attachment:
                return
            if not self.ready.is_set():
                self._send_hello()
            self.call_later(self.hello_interval, tick)

        self.call_later(self.hello_interval, tick)

    def _detach_transport(self) -> None:
        if self._tfd < 0:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._tfd)
        if self._tclose:
            with contextlib.suppress(OSError):
                os.close(self._tfd)
        self._tfd = -1
        self._tx.clear()
        self._tx_len = 0
        self._set_congested(False)

    def _transport_lost(self, reason: str) -> None:
        self.log.info("%s: pipe %s; resetting %d streams", self.name, reason, len(self.streams))
        self._drop_session(f"pipe {reason}", lost_transport=True)
        self._detach_transport()
        if self._on_transport_lost is not None and not self._stopping:
            self._guard(self._on_transport_lost)

    def _on_transport(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_tx()
        # The virtio-serial port returns one small buffer per read: read a batch before parsing.
        budget = 1 << 20
        while mask & selectors.EVENT_READ and self._tfd >= 0 and budget > 0:
            try:
                data = os.read(self._tfd, 1 << 18)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._transport_lost(f"read failed: {exc}")
                return
            if not data:
                self._transport_lost("closed by the other side")
                return
            budget -= len(data)
            for item in self._decoder.feed(data):
                if isinstance(item, ProtocolError):
                    self._session_error(str(item))
                else:
                    try:
                        self._on_frame(item)
                    except Exception as exc:
                        self.log.exception("%s: internal error on a %s frame", self.name, Kind(item.kind).name)
                        self._session_error(f"internal error: {exc}")
                if self._tfd < 0:
                    return

    def _queue_tx(self, chunk: bytes | memoryview) -> None:
        if self._tfd < 0:
            return
        self._tx.append(chunk)
        self._tx_len += len(chunk)
        if self._tx_len >= _TX_HIGH:
            self._set_congested(True)

    def _flush_tx(self) -> None:
        tfd, tx = self._tfd, self._tx
        if tfd < 0:
            return
        try:
            self._tx_len -= _send_queued(tx, lambda bufs: os.writev(tfd, bufs))
        except OSError as exc:
            self._transport_lost(f"write failed: {exc}")
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if tx else 0)
        if want != self._tevents:
            self._tevents = want
            self._sel.modify(self._tfd, want, "transport")
        if self._congested and self._tx_len <= _TX_LOW:
            self._set_congested(False)

    def _set_congested(self, value: bool) -> None:
        if value == self._congested:
            return
        self._congested = value
        for stream in list(self.streams.values()):
            self._update(stream)

    # --- sessions ---------------------------------------------------------------------------------

    def _new_session(self) -> None:
        session = 0
        while session == 0 or session == self._session:
            session = int.from_bytes(os.urandom(8), "big")
        self._session = session
        self._peer_session = 0
        self._peer_seen = 0
        self.ready.clear()

    def _send_hello(self) -> None:
        self._queue_tx(encode_hello(self.role, self._session, self._peer_session, ready=self.ready.is_set()))

    def _session_error(self, problem: str) -> None:
        self.log.error("%s: bad frame from the peer (%s); resetting the session and %d streams",
                       self.name, problem, len(self.streams))
        self._drop_session(problem, lost_transport=False)
        self._new_session()
        self._decoder.resync()
        self._send_hello()

    def _drop_session(self, reason: str, *, lost_transport: bool) -> None:
        self.ready.clear()
        for stream in list(self.streams.values()):
            self._reset_stream(stream, notify_peer=False, error=errno.ECONNRESET)
        if lost_transport:
            self._peer_session = 0
            self._peer_seen = 0

    def _on_hello(self, hello: Hello) -> None:
        problem = ""
        if hello.role == self.role:
            problem = f"the peer has this end's role ({hello.role}); not connecting"
        elif hello.version != PROTOCOL_VERSION:
            problem = f"the peer speaks mux protocol {hello.version}, this end {PROTOCOL_VERSION}; not connecting"
        if problem:
            if problem != self._peer_problem:
                self.log.error("%s: %s", self.name, problem)
            self._peer_problem = problem
            return
        self._peer_problem = ""
        new_peer = hello.session != self._peer_session
        if new_peer:
            if self._peer_session or self.streams:
                self.log.info("%s: peer started a new session; resetting %d streams",
                              self.name, len(self.streams))
            self._drop_session("peer restarted", lost_transport=False)
            self._peer_session = hello.session
        self._peer_seen = hello.seen
        became_ready = hello.seen == self._session and not self.ready.is_set()
        if became_ready:
            self.sessions += 1
            self.log.debug("%s: session ready", self.name)
            self.ready.set()
        if new_peer or hello.seen != self._session or not hello.ready:
            self._send_hello()
        if became_ready:
            pending, self._pending_opens = self._pending_opens, []
            for item in pending:
                self._send_open(item.port, item.sock, item.on_result, item.initial, item.deadline)

    # --- frames -----------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        kind, sid, payload = frame
        if kind == Kind.HELLO:
            self._on_hello(parse_hello(payload))
            return
        if not self.ready.is_set():
            return  # from a session we have not (re)established; discarded
        stream = self.streams.get(sid)
        if kind == Kind.DATA:
            if stream is None or stream.state != OPEN or stream.peer_eof:
                if stream is not None:
                    self.log.error("%s: DATA on stream %d in the wrong state; resetting it", self.name, sid)
                    self._reset_stream(stream, notify_peer=True)
                else:
                    self._queue_tx(encode(Kind.RESET, sid))
                return
            if len(payload) > stream.granted:
                self.log.error("%s: stream %d exceeded its window (%d > %d); resetting it",
                               self.name, sid, len(payload), stream.granted)
                self._reset_stream(stream, notify_peer=True)
                return
            if payload:
                stream.granted -= len(payload)
                stream.out.append(payload)
                stream.out_len += len(payload)
                self._write_local(stream)
        elif kind == Kind.WINDOW:
            if stream is not None and stream.state == OPEN:
                stream.credit += u32(payload)
                self._update(stream)
        elif kind == Kind.EOF:
            if stream is not None and stream.state == OPEN:
                stream.peer_eof = True
                if not stream.out:
                    self._shut_local(stream)
                self._maybe_done(stream)
        elif kind == Kind.RESET:
            if stream is not None:
                self._reset_stream(stream, notify_peer=False)
        elif kind == Kind.OPEN:
            port, window = parse_open(payload)
            self._on_peer_open(sid, port, window)
        elif kind == Kind.OPEN_OK:
            if stream is None or stream.state != OPENING:
                self._queue_tx(encode(Kind.RESET, sid))
                return
            stream.state = OPEN
            stream.credit = u32(payload)
            self._finish_open(stream, 0)
            if stream.pending:
                self._send_data(stream, stream.pending)
                stream.pending = b""
            self._update(stream)
        elif kind == Kind.OPEN_REFUSED and stream is not None and stream.state == OPENING:
            self._reset_stream(stream, notify_peer=False, error=u32(payload) or errno.ECONNREFUSED)

    def _on_peer_open(self, sid: int, port: int, window: int) -> None:
        if sid % 2 == self._next_sid % 2:
            self.log.error("%s: peer opened stream %d, an id of this end's parity; refused", self.name, sid)
            self._queue_tx(encode_u32(Kind.OPEN_REFUSED, sid, errno.EPROTO))
            return
        existing = self.streams.get(sid)
        if existing is not None:
            self.log.error("%s: peer re-opened live stream %d; resetting it", self.name, sid)
            self._reset_stream(existing, notify_peer=True)
            return
        if len(self.streams) >= self.max_streams:
            self.log.warning("%s: %d streams open; refusing port %d", self.name, len(self.streams), port)
            self._queue_tx(encode_u32(Kind.OPEN_REFUSED, sid, errno.EMFILE))
            return
        try:
            sock = self._on_open(port)
        except Exception:
            self.log.exception("%s: open handler for port %d failed", self.name, port)
            sock = None
        if sock is None:
            self._queue_tx(encode_u32(Kind.OPEN_REFUSED, sid, errno.ECONNREFUSED))
            return
        sock.setblocking(False)
        stream = _Stream(sid, port, sock, OPEN)
        stream.credit = window
        stream.granted = self.window
        self.streams[sid] = stream
        self._queue_tx(encode_u32(Kind.OPEN_OK, sid, self.window))
        self._update(stream)

    # --- opening streams from this end ------------------------------------------------------------

    def open_stream(
        self,
        port: int,
        sock: socket.socket,
        on_result: OpenResult | None = None,
        *,
        initial: bytes = b"",
        timeout: float | None = None,
    ) -> None:
        """Open a stream to `port` on the peer, pumped to/from `sock` (loop thread only).

        `on_result(0)` runs once the peer accepted, before any byte is delivered to `sock`;
        `on_result(errno)` if it refused, the session dropped or `timeout` passed (the socket is then
        closed). Waits for the session to be ready (within the timeout)."""
        deadline = time.monotonic() + (self.open_timeout if timeout is None else timeout)
        if not 0 <= port < 2**32:
            self._fail_pending(_PendingOpen(port, sock, on_result, initial, deadline), errno.EINVAL)
            return
        if not self.ready.is_set():
            item = _PendingOpen(port, sock, on_result, initial, deadline)
            self._pending_opens.append(item)
            self.call_later(max(0.0, deadline - time.monotonic()), lambda: self._expire_pending(item))
            return
        self._send_open(port, sock, on_result, initial, deadline)

    def _expire_pending(self, item: _PendingOpen) -> None:
        if item in self._pending_opens:
            self._pending_opens.remove(item)
            self._fail_pending(item, errno.ETIMEDOUT)

    def _fail_pending(self, item: _PendingOpen, error: int) -> None:
        with contextlib.suppress(OSError):
            item.sock.close()
        callback = item.on_result
        if callback is not None:
            self._guard(lambda: callback(error))

    def _send_open(
        self, port: int, sock: socket.socket, on_result: OpenResult | None, initial: bytes, deadline: float
    ) -> None:
        if len(self.streams) >= self.max_streams:
            self._fail_pending(_PendingOpen(port, sock, on_result, initial, deadline), errno.EMFILE)
            return
        sid = self._allocate_sid()
        sock.setblocking(False)
        stream = _Stream(sid, port, sock, OPENING)
        stream.on_result = on_result
        stream.pending = initial
        stream.granted = self.window
        self.streams[sid] = stream
        self._queue_tx(encode_open(sid, port, self.window))

        def expire() -> None:
            if self.streams.get(sid) is stream and stream.state == OPENING:
                self.log.debug("%s: port %d did not answer in time", self.name, port)
                self._reset_stream(stream, notify_peer=True, error=errno.ETIMEDOUT)

        self.call_later(max(0.0, deadline - time.monotonic()), expire)

    def _allocate_sid(self) -> int:
        while True:
            sid = self._next_sid
            self._next_sid += 2
            if self._next_sid >= 2**32:
                self._next_sid -= 2**32 - 2
            if sid not in self.streams:
                return sid

    def _finish_open(self, stream: _Stream, error: int) -> None:
        callback, stream.on_result = stream.on_result, None
        if callback is not None:
            self._guard(lambda: callback(error))

    # --- stream pumping ---------------------------------------------------------------------------

    def _update(self, stream: _Stream) -> None:
        """Register the stream's socket for exactly the events it can act on now."""
        if self.streams.get(stream.sid) is not stream:
            return
        events = 0
        if stream.state == OPEN:
            if not stream.local_eof and stream.credit > 0 and not self._congested:
                events |= selectors.EVENT_READ
            if stream.out:
                events |= selectors.EVENT_WRITE
        if events == stream.events:
            return
        if stream.events == 0:
            self._sel.register(stream.fd, events, stream)
        elif events == 0:
            self._sel.unregister(stream.fd)
        else:
            self._sel.modify(stream.fd, events, stream)
        stream.events = events

    def _on_stream(self, stream: _Stream, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write_local(stream)
            if self.streams.get(stream.sid) is not stream:
                return
        if mask & selectors.EVENT_READ:
            self._read_local(stream)

    def _read_local(self, stream: _Stream) -> None:
        want = min(stream.credit, MAX_PAYLOAD)
        if want <= 0 or stream.local_eof:
            self._update(stream)
            return
        try:
            data = stream.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._reset_stream(stream, notify_peer=True)
            return
        if data:
            self._send_data(stream, data)
        else:
            stream.local_eof = True
            self._queue_tx(encode(Kind.EOF, stream.sid))
            self._maybe_done(stream)
        self._update(stream)

    def _send_data(self, stream: _Stream, data: bytes) -> None:
        view = memoryview(data)
        for offset in range(0, len(data), MAX_PAYLOAD):
            chunk = view[offset : offset + MAX_PAYLOAD]
            self._queue_tx(HEADER.pack(Kind.DATA, stream.sid, len(chunk)))
            self._queue_tx(chunk)
        stream.credit -= len(data)

    def _write_local(self, stream: _Stream) -> None:
        out = stream.out
        try:
            written_total = _send_queued(out, stream.sock.sendmsg)
        except OSError:
            self._reset_stream(stream, notify_peer=True)
            return
        stream.out_len -= written_total
        if written_total:
            stream.unacked += written_total
            if stream.unacked >= self.window // 4 or (not out and stream.granted < self.window // 2):
                stream.granted += stream.unacked
                self._queue_tx(encode_u32(Kind.WINDOW, stream.sid, stream.unacked))
                stream.unacked = 0
        if not out and stream.peer_eof:
            self._shut_local(stream)
            if self._maybe_done(stream):
                return
        self._update(stream)

    def _shut_local(self, stream: _Stream) -> None:
        if not stream.shut:
            stream.shut = True
            with contextlib.suppress(OSError):
                stream.sock.shutdown(socket.SHUT_WR)

    def _maybe_done(self, stream: _Stream) -> bool:
        if stream.local_eof and stream.peer_eof and stream.shut and not stream.out:
            self._forget(stream)
            return True
        return False

    def _forget(self, stream: _Stream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        if stream.events:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(stream.fd)
            stream.events = 0
        with contextlib.suppress(OSError):
            stream.sock.close()

    def _reset_stream(self, stream: _Stream, *, notify_peer: bool, error: int = errno.ECONNRESET) -> None:
        if self.streams.get(stream.sid) is not stream:
            return
        self._forget(stream)
        if notify_peer and self.ready.is_set():
            self._queue_tx(encode(Kind.RESET, stream.sid))
        if stream.on_result is not None:
            self._finish_open(stream, error)
