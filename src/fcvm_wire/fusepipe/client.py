"""The fuse-pipe client: a thin relay between /dev/fuse and a byte stream to the fuse-pipe server.

Requests read from /dev/fuse are written to the stream unchanged; replies coming back are written to the
/dev/fuse fd the request was read from (each cloned fd has its own processing queue). Notifications
(unique 0) are written by a separate thread, because the kernel may block a notification on an inode lock
held by a request that is itself waiting for its reply.

If the stream breaks, the relay reconnects (calling `connect` again, with backoff) and re-sends every request
that has not been answered; the kernel mount never notices.

Two requests the relay answers itself, because the server's answer is known without asking (each saves a
round trip to the host on every written file):
- GETXATTR security.capability: no data. The server answers the same (file capabilities mean nothing on a
  nosuid mount, and the host's kernel strips them itself when the server writes the file); the guest kernel
  asks before every write.
- FLUSH of a node no POSIX lock request (GETLK, SETLK, SETLKW) has been sent for: the server's FLUSH only
  drops the lock owner's POSIX locks (close(2) on the host reports no write error on local filesystems).
  Once a node has seen a lock request, its FLUSHes go to the server as before.

And, from what the server tells it (fcvm_wire.fusepipe.dircache), a directory's GETATTR after a name operation
in it and a LOOKUP of a name the directory does not have: two of the three round trips a create makes while
the guest kernel holds the directory's lock. And a small file's content, sent with the reply to its read-only
OPEN, goes into the guest's page cache before that reply (`_store`): the first read needs no round trip.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import queue
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from fcvm_wire.fusepipe import proto
from fcvm_wire.fusepipe.dircache import DirCache

_log = logging.getLogger("fc_agent.fusepipe")

FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
READ_BUFFER = proto.MAX_FRAME + 4096
STREAM_BUFFER = 2 * proto.MAX_FRAME  # always room for one whole message after a partial one
BATCH_BYTES = 256 << 10  # send what has been read from /dev/fuse once this much is queued...
BATCH_MESSAGES = 64  # ...or this many requests
MAX_LOCKED_NODES = 4096  # nodes remembered as having seen a lock request; beyond, every FLUSH goes to the server
_DIR_ANSWERS = frozenset({proto.LOOKUP, proto.GETATTR})  # when the DirCache knows
_ANSWERED_HERE = frozenset({proto.FLUSH, proto.GETXATTR, proto.GETLK, proto.SETLK, proto.SETLKW})
_CAPABILITY = b"security.capability\0"
_GETXATTR_NAME = proto.IN_HEADER.size + 8  # after fuse_getxattr_in (size, padding)
_LK_FLAGS = proto.IN_HEADER.size + 40  # fuse_lk_in: fh, owner, start, end, type, pid, then lk_flags


class RelayGiveUp(Exception):
    """Raised by a `connect` callable to stop reconnecting: the relay aborts the mount and returns."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount_fuse(mountpoint: str, *, read_only: bool = False, fsname: str = "fusepipe") -> int:
    """Open /dev/fuse and mount it at `mountpoint`; returns the /dev/fuse fd."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    st = os.stat(mountpoint)
    rootmode = st.st_mode & 0o170000
    opts = (f"fd={fd},rootmode={rootmode:o},user_id=0,group_id=0,default_permissions,allow_other")
    # The host served the files; what they mean there is the host's business. A setuid bit or a device node
    # the host directory has (the server never makes one) grants nothing in the guest either.
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    libc = _libc()
    res = libc.mount(fsname.encode(), mountpoint.encode(), b"fuse.fusepipe", ctypes.c_ulong(flags), opts.encode())
    if res != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount fuse at {mountpoint}: {os.strerror(err)}")
    return fd


def clone_fd(fd: int) -> int:
    new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
    except OSError:
        os.close(new)
        raise
    return new


def unmount(mountpoint: str, *, conn_id: int | None = None) -> None:
    """Unmount; if busy, detach lazily and abort the FUSE connection so the relay's readers return."""
    libc = _libc()
    if libc.umount2(mountpoint.encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # not mounted (any more)
        return
    libc.umount2(mountpoint.encode(), MNT_DETACH)
    if conn_id is not None:
        with contextlib.suppress(OSError), open(f"/sys/fs/fuse/connections/{conn_id}/abort", "w") as f:
            f.write("1")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the stream during HELLO")
        buf += chunk
    return buf


def handshake(sock: socket.socket, session_id: int, read_only: bool, *, initialized: bool = False) -> bool:
    """Send HELLO, wait for HELLO_OK; returns whether the server knew the session."""
    flags = ((proto.HELLO_FLAG_READ_ONLY if read_only else 0) | (proto.HELLO_FLAG_INITIALIZED if initialized else 0)
             | proto.HELLO_FLAG_HINTS)
    sock.sendall(proto.HELLO.pack(proto.MAGIC, session_id, flags, 0))
    magic, status, resumed = proto.HELLO_OK.unpack(_recv_exact(sock, proto.HELLO_OK.size))
    if magic != proto.MAGIC or status != proto.HELLO_STATUS_OK:
        raise ConnectionError(f"bad HELLO_OK from server (status {status})")
    return bool(resumed)


class Relay:
    """One mount: the /dev/fuse fds, the stream and the threads moving messages between them."""

    def __init__(self, connect: Callable[[], socket.socket], mountpoint: str, *, readers: int = 1,
                 read_only: bool = False) -> None:
        self.connect = connect
        self.mountpoint = mountpoint
        self.readers = max(1, readers)
        self.read_only = read_only
        self.session_id = random.getrandbits(63) | 1
        self.fds: list[int] = []
        self.conn_id: int | None = None
        self.sock: socket.socket | None = None
        self.send_lock = threading.Lock()
        self.inflight: dict[int, tuple[int, bytes]] = {}  # the loop thread's alone: no lock
        self.notify_q: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.mounted = threading.Event()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.reconnects = 0
        self.locked_nodes: set[int] = set()  # nodes a POSIX lock request was sent for (FLUSH must go out)
        self.dirs = DirCache()  # the loop thread's alone
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)

    # ---- lifecycle --------------------------------------------------------------------------------
    def run(self) -> None:
        """Mount, relay until unmounted, clean up. Blocking."""
        try:
            self.sock = self._connect_once()
            fd = mount_fuse(self.mountpoint, read_only=self.read_only)
            self.fds = [fd]
            for _ in range(self.readers - 1):
                self.fds.append(clone_fd(fd))
            loop = threading.Thread(target=self._loop, name="fp-relay-loop", daemon=True)
            notify_thread = threading.Thread(target=self._notifier, name="fp-notify", daemon=True)
            for t in (loop, notify_thread):
                t.start()
            # Only now: stat() on the mount point waits for FUSE_INIT, which the loop relays.
            self.conn_id = os.minor(os.stat(self.mountpoint).st_dev)
            self.mounted.set()
            loop.join()
            self.stopping.set()
            self.notify_q.put(None)
            notify_thread.join(5)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.stopping.set()
            if self.sock is not None:
                self.sock.close()
            for f in (*self.fds, self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(f)
            self.mounted.set()
            self.finished.set()

    def stop(self) -> None:
        """Unmount (lazily if busy) and stop the readers; closing the last /dev/fuse fd aborts the
        connection, so `run` returns even while files on the mount are still open."""
        self.stopping.set()
        if self.fds:
            unmount(self.mountpoint, conn_id=self.conn_id)
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    # ---- stream ----------------------------------------------------------------------------------
    def _connect_once(self) -> socket.socket:
        sock = self.connect()
        try:
            handshake(sock, self.session_id, self.read_only, initialized=self.mounted.is_set())
        except BaseException:
            sock.close()
            raise
        return sock

    def _reconnect(self, broken: socket.socket) -> socket.socket | None:
        """Replace a broken stream; returns the new one (the caller re-sends what is in flight) or None when
        giving up."""
        with self.send_lock:
            with contextlib.suppress(OSError):
                broken.close()
            delay = 0.01
            while not self.stopping.is_set():
                try:
                    sock = self._connect_once()
                except RelayGiveUp as exc:
                    _log.warning("fuse-pipe: stream lost and no reconnect possible (%s); aborting mount", exc)
                    return None
                except OSError as exc:
                    _log.debug("fuse-pipe reconnect failed: %s", exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                self.sock = sock
                self.reconnects += 1
                return sock
            return None

    def _pending(self) -> bytearray:
        """Every request still waiting for its reply, in order (to re-send on a new stream)."""
        pending = [msg for _, (_, msg) in sorted(self.inflight.items())]
        _log.info("fuse-pipe: reconnected, re-sending %d requests", len(pending))
        return bytearray(b"".join(pending))

    @staticmethod
    def _reply(fd: int, msg: bytes | memoryview, unique: int) -> None:
        try:
            os.write(fd, msg)
        except OSError as exc:
            # ENOENT: the request was interrupted/aborted meanwhile. Anything else is the kernel
            # rejecting the reply: log it, the kernel fails that one request.
            if exc.errno != errno.ENOENT:
                _log.warning("fuse-pipe: kernel rejected reply unique=%d: %s", unique, exc)

    def _notifier(self) -> None:
        while True:
            msgs = self.notify_q.get()
            if msgs is None or not self.fds:
                return
            for msg in msgs:
                with contextlib.suppress(OSError):  # e.g. ENOENT for an inode the kernel already forgot
                    os.write(self.fds[0], msg)

    def _abort(self) -> None:
        self.stop()

    def _answered_here(self, fd: int, opcode: int, unique: int, msg: bytes) -> bool:
        """Answer `msg` without the server if its answer is known (see the module docstring); True if so.
        Lock requests are noted here on their way out: later FLUSHes of their node go to the server."""
        (nodeid,) = struct.unpack_from("<Q", msg, 16)
        if opcode == proto.FLUSH:
            if nodeid in self.locked_nodes or len(self.locked_nodes) >= MAX_LOCKED_NODES:
                return False
            self._reply(fd, proto.pack_reply(unique), unique)
            return True
        if opcode == proto.GETXATTR:
            if msg[_GETXATTR_NAME:_GETXATTR_NAME + len(_CAPABILITY)] != _CAPABILITY:
                return False
            self._reply(fd, proto.pack_reply(unique, -errno.ENODATA), unique)
            return True
        if len(msg) >= _LK_FLAGS + 4 and not struct.unpack_from("<I", msg, _LK_FLAGS)[0] & proto.LK_FLOCK:
            self.locked_nodes.add(nodeid)
        return False

    def _store(self, hint: memoryview) -> None:
        """A file's content that came with the reply to its read-only OPEN (still in flight: the reply follows
        in the stream): into the guest's page cache now, so the opener's first read finds it there. Written
        from the loop thread, which the server allows only when no READ can hold the file's pages locked
        (see fcvm.fusepipe.fs); a store the kernel refuses (the inode is gone) only costs the round trip."""
        head = proto.OUT_HEADER.size
        if len(hint) < head + proto.HINT_HEAD.size:
            return
        nodeid, unique, _ = proto.HINT_HEAD.unpack_from(hint, head)
        entry = self.inflight.get(unique)
        if entry is None or struct.unpack_from("<IQQ", entry[1], 4) != (proto.OPEN, unique, nodeid):
            return
        data = hint[head + proto.HINT_HEAD.size:]  # written from the stream buffer (writev), not copied
        out = proto.NOTIFY_STORE_OUT.pack(nodeid, 0, len(data), 0)
        note = proto.OUT_HEADER.pack(head + len(out) + len(data), proto.NOTIFY_STORE, 0)
        with contextlib.suppress(OSError):
            os.writev(entry[0], [note, out, data])

    # ---- the relay loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        """Move requests from the /dev/fuse fds to the stream and replies back, in one thread.

        One thread (instead of one per direction) means no GIL hand-offs and one poll() wake-up for all
        the work that is ready. Everything queued on a /dev/fuse fd is read before sending, so a burst of
        requests goes out in one send; everything one recv brings is answered before sleeping again. The
        stream is non-blocking with an output buffer, so a server busy sending replies never deadlocks with
        a relay busy sending requests; while that buffer is full, requests stay queued in the kernel."""
        sock = self.sock
        assert sock is not None
        sock.setblocking(False)
        fuse_fds = set(self.fds)
        for fd in fuse_fds:
            os.set_blocking(fd, False)
        poller = select.poll()
        for fd in fuse_fds:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poller.register(sock, select.POLLIN)
        out = bytearray()  # requests not yet sent
        want_out = False  # POLLOUT registered on the stream
        reading = True  # POLLIN registered on the /dev/fuse fds
        rbuf = bytearray(STREAM_BUFFER)
        rview = memoryview(rbuf)
        start = end = 0
        rbuf_fd = bytearray(READ_BUFFER)
        rview_fd = memoryview(rbuf_fd)
        readv = os.readv
        unpack_from = struct.unpack_from
        no_reply = proto.NO_REPLY
        answered_here = _ANSWERED_HERE
        make_room = proto.make_room
        inflight = self.inflight
        dirs = self.dirs
        dir_answers = _DIR_ANSWERS
        hints = proto.HINTS
        store_hint = proto.HINT_STORE
        stop_r = self._stop_r
        header = proto.IN_HEADER.size
        while True:
            broken = False
            notes: list[bytes] = []  # notifications: handed to the notifier thread once per round
            for fd, _ev in poller.poll():
                if fd in fuse_fds:
                    # Drain this /dev/fuse fd (up to a batch).
                    count = 0
                    while count < BATCH_MESSAGES and len(out) < BATCH_BYTES:
                        try:
                            n = readv(fd, [rbuf_fd])
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if exc.errno in (errno.ENOENT, errno.EINTR):
                                continue
                            # ENODEV, or ECONNABORTED (seen on 6.18 after an ordinary unmount): the mount is gone.
                            if exc.errno not in (errno.ENODEV, errno.ECONNABORTED):
                                _log.warning("fuse-pipe: /dev/fuse read failed: %s", exc)
                            fuse_fds.discard(fd)
                            poller.unregister(fd)
                            break
                        if n < header:
                            continue
                        msg = bytes(rview_fd[:n])
                        opcode, unique, nodeid = unpack_from("<IQQ", msg, 4)
                        if opcode in answered_here and self._answered_here(fd, opcode, unique, msg):
                            continue
                        if opcode in dir_answers:
                            known = dirs.answer(opcode, unique, nodeid, msg)
                            if known is not None:
                                self._reply(fd, known, unique)
                                continue
                        dirs.sent(opcode, unique, nodeid, msg)
                        if opcode not in no_reply:
                            inflight[unique] = (fd, msg)
                        out += msg
                        count += 1
                    if not fuse_fds:
                        return  # unmounted
                elif fd == stop_r:
                    return
                else:  # the stream
                    start, end = make_room(rview, start, end)
                    try:
                        n = sock.recv_into(rview[end:])
                    except BlockingIOError:
                        continue
                    except OSError:
                        n = 0
                    if not n:
                        broken = True
                        continue
                    end += n
                    while end - start >= proto.MIN_REPLY:
                        length, code, unique = unpack_from("<IiQ", rbuf, start)
                        if length < proto.MIN_REPLY or length > proto.MAX_FRAME:
                            _log.error("fuse-pipe: malformed stream from server (bad message length); "
                                       "reconnecting")
                            broken = True
                            break
                        if end - start < length:
                            break
                        if unique == 0:
                            if code == store_hint:
                                self._store(rview[start:start + length])
                            elif code in hints:
                                dirs.hint(code, rview[start:start + length],
                                          ((u, m) for u, (_, m) in inflight.items()))
                            else:
                                dirs.notified(code, rview[start:start + length])
                                notes.append(bytes(rview[start:start + length]))
                        else:
                            entry = inflight.pop(unique, None)
                            if entry is not None:  # else: a duplicate after a re-send, or a dropped request
                                self._reply(entry[0], rview[start:start + length], unique)
                        start += length
                    if start == end:
                        start = end = 0
            if notes:
                self.notify_q.put(notes)
            if out and not broken:
                try:
                    sent = sock.send(out)
                    del out[:sent]
                except BlockingIOError:
                    pass
                except OSError:
                    broken = True
            if broken:
                if self.stopping.is_set():
                    return
                poller.unregister(sock)
                new = self._reconnect(sock)
                if new is None:
                    self._abort()
                    return
                sock = new
                sock.setblocking(False)
                poller.register(sock, select.POLLIN)
                want_out = False
                start = end = 0
                dirs.clear()
                out = self._pending()  # requests sent but unanswered, and those never sent
            # Flow control: POLLOUT while output is pending; stop reading /dev/fuse while it is large.
            if bool(out) != want_out:
                want_out = bool(out)
                poller.modify(sock, select.POLLIN | (select.POLLOUT if want_out else 0))
            if (len(out) < BATCH_BYTES) != reading:
                reading = not reading
                for fd in fuse_fds:
                    poller.modify(fd, select.POLLIN if reading else 0)


def relay(connect: Callable[[], socket.socket], mountpoint: str, *, readers: int = 1,
          read_only: bool = False) -> None:
    """Mount `mountpoint` and relay until it is unmounted. Blocking."""
    Relay(connect, mountpoint, readers=readers, read_only=read_only).run()


class RelayHandle:
    """A relay running in a background thread: `wait_mounted()`, `unmount()`, `join()`."""

    def __init__(self, relay_obj: Relay) -> None:
        self.relay = relay_obj
        self.thread = threading.Thread(target=self._run, name="fp-relay", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(BaseException):
            self.relay.run()

    def wait_mounted(self, timeout: float | None = None) -> None:
        if not self.relay.mounted.wait(timeout):
            raise TimeoutError(f"fuse-pipe mount at {self.relay.mountpoint} not ready")
        if self.relay.error is not None:
            raise self.relay.error

    def unmount(self, timeout: float = 10.0) -> None:
        self.relay.stop()
        self.thread.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def finished(self) -> bool:
        return self.relay.finished.is_set()


def start_relay(connect: Callable[[], socket.socket], mountpoint: str, *, readers: int = 1,
                read_only: bool = False, timeout: float = 10.0) -> RelayHandle:
    """Start a relay in a background thread and wait until the mount is live (raises if mounting failed)."""
    handle = RelayHandle(Relay(connect, mountpoint, readers=readers, read_only=read_only))
    handle.thread.start()
    handle.wait_mounted(timeout)
    return handle


def vsock_connect(port: int, cid: int = 2) -> Callable[[], socket.socket]:
    """A `connect` callable for the guest: AF_VSOCK to the host (CID 2) on `port`."""
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.connect((cid, port))
        except BaseException:
            sock.close()
            raise
        return sock
    return connect


def unix_connect(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock
    return connect
