"""inotify- and fanotify-driven cache invalidation: host-side changes reach the guest kernel at once.

Every directory a session's kernel knows (has a node id for) is watched. All the sessions of one server
share one inotify instance and one fanotify group (`InotifyHub`; the host has few of each: 128 per user by
default) and their reader thread, which lets a burst's events gather for a couple of milliseconds before it
reads them (see `GATHER_SECONDS`); a directory several sessions know is one watch, and each event goes to
every session watching it. An event
on a name becomes FUSE_NOTIFY_INVAL_ENTRY(parent, name) (expire-only where the kernel supports it, so
dentries in use, or mounted on, are revalidated rather than dropped) and, for a known child inode,
FUSE_NOTIFY_INVAL_INODE (data and attributes for writes, attributes only for metadata changes).

Changes the server makes itself on behalf of a session also produce events; that session's kernel already
knows about those (another session's does not: it gets them, as host-side changes). The name events they
cause (create, delete, rename) are not forwarded to it: `expect()` registers the operation before its
syscall, and a matching event consumes the registration. After the syscall, `done()` bounds it to the bytes
queued on the shared inotify fd at that moment (the event is queued before the syscall returns);
registrations whose window has been read are forgotten, so one whose event never came (the file already
existed, say) cannot swallow a later host-side event. If the syscall failed, an event that was held back
was someone else's, and is forwarded then.

Content changes (writes, truncation) come from fanotify where the filesystem allows (`ContentWatch`): fanotify
merges an event only into one of the same process's, and names the process, so the writes this process makes
itself (a guest's WRITEs: its kernel knows them) are dropped, unless another session, of this server or of
another in this process, watches the directory too. Where fanotify cannot watch a directory, inotify's
IN_MODIFY is forwarded instead, as attribute changes (IN_ATTRIB) always are: inotify merges identical
consecutive events whoever caused them, so an event of the server's own could hide a host-side change.
(Another writer in this process would be taken for the server too, and its change seen in the guest only
when the attribute timeout runs out; fcvm's VM supervisor, which hosts its volumes' servers, writes nothing
into them.)

A watch is added with the credentials of the request that made the directory known (inotify needs read
permission): a directory that request cannot read is not watched, and its host-side changes show up after
the cache timeouts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator

from fcvm.core import log
from fcvm.fusepipe import sysc
from fcvm.fusepipe.inodes import Inode, InodeTable
from fcvm_wire.fusepipe import proto

_log = log.get("fusepipe")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_MASK = IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR | IN_EXCL_UNLINK
_ENTRY_EVENTS = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")
_FIONREAD = 0x541B
_READ_SIZE = 65536
GATHER_SECONDS = 0.002  # how long events gather before the hub reads them
FAN_MODIFY = 0x2
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
_FAN_METADATA = struct.Struct("<IBBHQii")  # event_len vers reserved metadata_len mask fd pid
_FAN_INFO = struct.Struct("<BBH8s")  # info_type pad len fsid; then struct file_handle and the name
_FAN_EVENT_INFO_TYPE_DFID_NAME = 2
_HANDLE_HEAD = struct.Struct("<Ii")  # struct file_handle: handle_bytes handle_type

# Directories watched in this process, by (st_dev, st_ino): how many hubs (servers) watch each, whether
# fanotify serves them or not. A write of this process's own is dropped only when one hub watches the
# directory, for one session: then that session made it.
_hubs_watching: dict[tuple[int, int], int] = {}
_hubs_lock = threading.Lock()


def _count_hub(key: tuple[int, int], change: int) -> None:
    with _hubs_lock:
        left = _hubs_watching.get(key, 0) + change
        if left:
            _hubs_watching[key] = left
        else:
            del _hubs_watching[key]


class ContentWatch:
    """fanotify FAN_MODIFY marks on the watched directories (for their files), mapped back by file handle."""

    def __init__(self) -> None:
        self.fd = sysc.fanotify_init()
        self.by_handle: dict[bytes, int] = {}  # a directory's handle -> its inotify watch descriptor
        self.handles: dict[int, bytes] = {}  # and back

    def add(self, path: bytes, fd: int) -> bytes | None:
        """Mark the directory `fd` (at `path`); its handle, or None if fanotify cannot watch it."""
        try:
            handle = sysc.file_handle(fd)
            sysc.fanotify_mark(self.fd, True, FAN_MODIFY | FAN_EVENT_ON_CHILD, path)
        except OSError:  # a filesystem without file handles, or the marks limit: inotify's IN_MODIFY then
            return None
        return handle

    def register(self, wd: int, handle: bytes) -> None:
        """Caller holds the hub's lock."""
        self.handles[wd] = handle
        self.by_handle[handle] = wd

    def drop(self, wd: int, path: bytes | None) -> None:
        """The watch `wd` is gone; so is its mark (`path`: the directory, None if the kernel removed the mark).
        Caller holds the hub's lock."""
        handle = self.handles.pop(wd, None)
        if handle is None:
            return
        if self.by_handle.get(handle) == wd:
            del self.by_handle[handle]
        if path is not None:
            self.unmark(path)

    def unmark(self, path: bytes) -> None:
        with contextlib.suppress(OSError):  # the directory may be gone, and its mark with it
            sysc.fanotify_mark(self.fd, False, FAN_MODIFY | FAN_EVENT_ON_CHILD, path)

    def read(self) -> bytes:
        try:
            return os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return b""

    def events(self, data: bytes) -> Iterator[tuple[int, bytes, bytes] | None]:
        """(writer's pid, directory handle, name) per event read; None for a queue overflow."""
        pos = 0
        while pos + _FAN_METADATA.size <= len(data):
            event_len, _vers, _, meta_len, mask, _fd, pid = _FAN_METADATA.unpack_from(data, pos)
            if event_len < _FAN_METADATA.size:
                return
            if mask & FAN_Q_OVERFLOW:
                yield None
            else:
                info = pos + meta_len
                info_type, _, _, _ = _FAN_INFO.unpack_from(data, info)
                if info_type == _FAN_EVENT_INFO_TYPE_DFID_NAME:
                    start = info + _FAN_INFO.size
                    size, _ = _HANDLE_HEAD.unpack_from(data, start)
                    end = start + _HANDLE_HEAD.size + size
                    name = data[end:pos + event_len].split(b"\0", 1)[0]
                    yield pid, data[start:end], name
            pos += event_len

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Expectation:
    """One name operation of a session's own, whose inotify event is not to be forwarded to that session."""

    __slots__ = ("key", "limit", "matched", "name", "parent")

    def __init__(self, parent: Inode, kind: int, name: bytes) -> None:
        self.parent = parent
        self.name = name
        self.key = (parent.wd, kind, name)
        self.limit: int | None = None  # None while the syscall runs: any matching event is its own
        self.matched = False


class InotifyHub:
    """One inotify instance (and fanotify group) and their reader thread, shared by the `Invalidator`s of a
    server's sessions."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.lock = threading.Lock()
        self.watchers: dict[int, dict[Invalidator, Inode]] = {}  # wd -> the sessions watching it, their inode
        self.keys: dict[int, tuple[int, int]] = {}  # wd -> its directory's (st_dev, st_ino)
        # Expectations of every session, and the inotify stream position: once a syscall has returned, its
        # event lies below its expectation's limit in the stream (bytes ever read + bytes queued).
        self.exp_lock = threading.Lock()
        self.consumed = 0
        self.warned = False
        self.pid = os.getpid()
        try:
            self.content: ContentWatch | None = ContentWatch()
        except OSError as exc:  # no fanotify here: inotify's IN_MODIFY, forwarded whoever wrote
            _log.debug("fuse-pipe: no fanotify (%s); the server's own writes invalidate its guest's cache too", exc)
            self.content = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._loop, name="fp-inotify", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self.thread.is_alive():
            self.thread.join(5)
        for fd in (self.fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with self.lock:
            for key in self.keys.values():
                _count_hub(key, -1)
            self.keys.clear()
            if self.content is not None:
                for wd in list(self.content.handles):
                    self.content.drop(wd, None)  # the marks go with the group
        if self.content is not None:
            self.content.close()

    def add(self, inv: Invalidator, ino: Inode) -> int:
        """Watch `ino` (a directory) for `inv`; returns the watch descriptor, or -1 if it cannot be watched."""
        path = f"/proc/self/fd/{ino.fd}".encode()
        handle = self.content.add(path, ino.fd) if self.content is not None else None
        wd = _libc.inotify_add_watch(self.fd, path, _MASK if handle is not None else _MASK | IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            if not self.warned and err == errno.ENOSPC:
                self.warned = True
                _log.warning("fuse-pipe: inotify watch limit reached (fs.inotify.max_user_watches); "
                             "host-side changes in further directories show up after the cache timeout")
            if handle is not None and self.content is not None:
                with self.lock:
                    if handle not in self.content.by_handle:  # marked for nothing: no watch to map it to
                        self.content.unmark(path)
            return -1
        with self.lock:
            self.watchers.setdefault(wd, {})[inv] = ino
            if wd not in self.keys:
                self.keys[wd] = ino.key
                _count_hub(ino.key, 1)
            if handle is not None and self.content is not None:
                self.content.register(wd, handle)
        return wd

    def _forget(self, wd: int, path: bytes | None) -> None:
        """No session watches `wd` any more (caller holds the lock; `path`: see ContentWatch.drop)."""
        key = self.keys.pop(wd, None)
        if key is not None:
            _count_hub(key, -1)
        if self.content is not None:
            self.content.drop(wd, path)

    def remove(self, inv: Invalidator, wd: int, ino: Inode) -> None:
        """`inv` no longer watches `wd` (the directory `ino`, still open); the watch goes when no session has
        it."""
        with self.lock:
            sessions = self.watchers.get(wd)
            if sessions is None or sessions.pop(inv, None) is None or sessions:
                return
            del self.watchers[wd]
            _libc.inotify_rm_watch(self.fd, wd)
            self._forget(wd, f"/proc/self/fd/{ino.fd}".encode())

    def queued(self) -> int:
        buf = bytearray(4)
        try:
            fcntl.ioctl(self.fd, _FIONREAD, buf)
        except OSError:
            return 0
        return int.from_bytes(buf, "little")

    # ---- events ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        if self.content is not None:
            poller.register(self.content.fd, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if self._stop_r in ready:
                return
            # Let a burst's events gather first: under load most are the server's own (a create, a write),
            # and each wake-up of this thread takes the GIL from the threads serving requests.
            time.sleep(GATHER_SECONDS)
            if not self.read_once():
                return

    def read_once(self) -> bool:
        """Read and handle the queued events; False when the inotify fd is gone."""
        # Reading and matching under exp_lock: expect() sees either all of a read or none of it.
        with self.exp_lock:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                data = b""
            except OSError:
                return False
            content = self.content.read() if self.content is not None else b""
            if not data and not content:
                return True
            base = self.consumed
            self.consumed += len(data)
            invalidators = self._invalidators()
            for inv in invalidators:
                inv.batch = []
            try:
                self._handle(data, base)
                self._handle_content(content)
            except Exception:
                _log.exception("fuse-pipe: inotify event handling failed")
            finally:
                for inv in invalidators:
                    if inv.expected:
                        inv.expire(self.consumed)
        # The changed children looked up, and everything sent, outside exp_lock: the requests that create, remove
        # or rename (expect() and done() around their syscalls) never wait for that work, and a guest slow to read
        # its stream holds up no other session's requests.
        children: dict[Invalidator, list[bytes]] = {}
        for inv in invalidators:
            try:
                children[inv] = inv.changed_children()
            except Exception:
                _log.exception("fuse-pipe: inotify event handling failed")
        with self.exp_lock:  # done() appends to a batch under exp_lock: none is taken while it does
            batches = [(inv, inv.take_batch() + children.get(inv, [])) for inv in invalidators]
        for inv, batch in batches:
            if batch:
                inv.send(b"".join(batch))
        return True

    def _invalidators(self) -> set[Invalidator]:
        """Every session watching anything."""
        with self.lock:
            return {inv for sessions in self.watchers.values() for inv in sessions}

    def _overflow(self) -> None:
        """Events were lost (a queue overflowed): every session may hold stale entries."""
        for inv in self._invalidators():
            inv.overflow()

    def _handle(self, data: bytes, base: int) -> None:
        pos = 0
        seen: set[tuple[Invalidator, int, int, bytes]] = set()
        while pos + _EVENT.size <= len(data):
            offset = base + pos
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            name = data[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self._overflow()
                continue
            with self.lock:
                if mask & IN_IGNORED:  # the directory is gone: so is its watch, for every session
                    for inv, parent in self.watchers.pop(wd, {}).items():
                        inv.forget_watch(parent)
                    self._forget(wd, None)
                    continue
                watching = list(self.watchers.get(wd, {}).items())
            for inv, parent in watching:
                inv.event(parent, mask, name, offset, seen)

    def _handle_content(self, data: bytes) -> None:
        if not data or self.content is None:
            return
        seen: set[tuple[Invalidator, int, int, bytes]] = set()
        for event in self.content.events(data):
            if event is None:
                self._overflow()
                continue
            pid, handle, name = event
            with self.lock:
                wd = self.content.by_handle.get(handle)
                if wd is None:
                    continue
                watching = list(self.watchers.get(wd, {}).items())
                key = self.keys.get(wd)
            if pid == self.pid and len(watching) == 1 and key is not None and _hubs_watching.get(key) == 1:
                continue  # the one session watching wrote it: its kernel knows
            for inv, parent in watching:
                inv.event(parent, IN_MODIFY, name, 0, seen)


class Invalidator:
    """Watches the directories in one session's `table` (through the server's hub); calls
    `send(notify_message)` for each invalidation that session's kernel needs."""

    def __init__(self, hub: InotifyHub, table: InodeTable, send: Callable[[bytes], None],
                 expire_only: Callable[[], bool]) -> None:
        self.hub = hub
        self.table = table
        self.send = send
        self.expire_only = expire_only
        self.lock = threading.Lock()
        self.by_wd: dict[int, Inode] = {}
        # This session's own name operations, by (wd, event kind, name); guarded by hub.exp_lock.
        self.expected: dict[tuple[int, int, bytes], list[Expectation]] = {}
        self.batch: list[bytes] | None = None  # notifications of the read being handled (hub thread)
        self.children: list[tuple[Inode, bytes, int]] = []  # (parent, name, pages) to invalidate (hub thread)
        table.on_new_dir = self.watch
        table.on_drop = self.unwatch
        self.watch(table.root)

    def watch(self, ino: Inode) -> None:
        wd = self.hub.add(self, ino)
        if wd < 0:
            return
        with self.lock:
            ino.wd = wd
            self.by_wd[wd] = ino

    def unwatch(self, ino: Inode) -> None:
        if ino.wd < 0:
            return
        with self.lock:
            wd = ino.wd
            ino.wd = -1
            if self.by_wd.get(wd) is not ino:
                return
            del self.by_wd[wd]
        self.hub.remove(self, wd, ino)

    def forget_watch(self, ino: Inode) -> None:
        """The hub dropped this watch (IN_IGNORED: the directory is gone)."""
        with self.lock:
            if self.by_wd.get(ino.wd) is ino:
                del self.by_wd[ino.wd]
            ino.wd = -1

    def close(self) -> None:
        with self.lock:
            watched = list(self.by_wd.items())
            self.by_wd.clear()
        for wd, ino in watched:
            ino.wd = -1
            self.hub.remove(self, wd, ino)

    def expect(self, parent: Inode, name: bytes, kind: int) -> Expectation | None:
        """Called just before the server creates/removes/renames `name` in `parent` for this session (kind:
        IN_CREATE, IN_DELETE, IN_MOVED_FROM or IN_MOVED_TO); `done()` must follow the syscall."""
        if parent.wd < 0:
            return None
        e = Expectation(parent, kind, name)
        with self.hub.exp_lock:
            self.expected.setdefault(e.key, []).append(e)
        return e

    def done(self, e: Expectation | None, ok: bool) -> None:
        """The syscall `e` was registered for has returned (`ok`: it succeeded)."""
        if e is None:
            return
        with self.hub.exp_lock:
            if e.matched:
                if not ok:  # the event was someone else's after all: forward what was held back
                    self._inval_entry(e.parent.nodeid, e.name)
                    self._inval_inode(e.parent.nodeid, -1)
                return
            queued = self.hub.queued() if ok else 0
            if queued:
                e.limit = self.hub.consumed + queued  # its event, if any, is among the bytes queued now
            else:  # failed, or no event came: the reader would have matched it, it holds exp_lock
                pending = self.expected.get(e.key, [])
                if e in pending:
                    pending.remove(e)
                    if not pending:
                        del self.expected[e.key]

    def _expected(self, wd: int, kind: int, name: bytes, offset: int) -> bool:
        """Consume one expectation an event at stream `offset` can be the result of (caller holds exp_lock)."""
        key = (wd, kind, name)
        pending = self.expected.get(key)
        if not pending:
            return False
        for i, e in enumerate(pending):
            if e.limit is None or offset < e.limit:
                e.matched = True
                del pending[i]
                if not pending:
                    del self.expected[key]
                return True
        return False

    def expire(self, consumed: int) -> None:
        """Drop the expectations whose window has been read completely (caller holds exp_lock)."""
        for key in list(self.expected):
            pending = [e for e in self.expected[key] if e.limit is None or e.limit > consumed]
            if pending:
                self.expected[key] = pending
            else:
                del self.expected[key]

    # ---- events (hub thread, under hub.exp_lock) --------------------------------------------------
    def event(self, parent: Inode, mask: int, name: bytes, offset: int,
              seen: set[tuple[Invalidator, int, int, bytes]]) -> None:
        if mask & _ENTRY_EVENTS and self.expected and self._expected(parent.wd, mask & _ENTRY_EVENTS, name,
                                                                      offset):
            return
        kind = 0 if mask & _ENTRY_EVENTS else (1 if mask & IN_MODIFY else 2)
        key = (self, parent.nodeid, kind, name)
        if key in seen:  # coalesce repeats within one read
            return
        seen.add(key)
        if mask & _ENTRY_EVENTS and name:
            self._inval_entry(parent.nodeid, name)
            self._inval_inode(parent.nodeid, -1)
        if mask & (IN_MODIFY | IN_ATTRIB) or (mask & _ENTRY_EVENTS and name):
            pages = 0 if mask & IN_MODIFY else -1  # the offset of FUSE_NOTIFY_INVAL_INODE: -1 attributes only
            if name:
                self.children.append((parent, name, pages))  # its inode: looked up after the read is matched
            else:
                self._inval_inode(parent.nodeid, pages)

    def changed_children(self) -> list[bytes]:
        """The inode invalidations of the children the events just handled named (hub thread)."""
        children, self.children = self.children, []
        msgs = []
        for parent, name, pages in children:
            child = self._child(parent, name)
            if child is not None:
                msgs.append(_inval_inode_msg(child.nodeid, pages))
        return msgs

    def overflow(self) -> None:
        """Events were lost: everything this session knows may be stale."""
        self.expected.clear()
        with self.table.lock:
            nodeids = list(self.table.by_id)
        for nodeid in nodeids:
            self._inval_inode(nodeid, 0)

    def take_batch(self) -> list[bytes]:
        """The notifications of the read just handled; from now on they are sent as they come."""
        batch, self.batch = self.batch, None
        return batch or []

    def _child(self, parent: Inode, name: bytes) -> Inode | None:
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return None
        return self.table.lookup_key((st.st_dev, st.st_ino))

    def _inval_entry(self, parent: int, name: bytes) -> None:
        flags = proto.EXPIRE_ONLY if self.expire_only() else 0
        self._emit(proto.pack_notify(proto.NOTIFY_INVAL_ENTRY,
                                     proto.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags) + name + b"\0"))

    def _inval_inode(self, nodeid: int, offset: int) -> None:
        self._emit(_inval_inode_msg(nodeid, offset))

    def _emit(self, msg: bytes) -> None:
        if self.batch is not None:  # while the hub handles one read: sent together at the end
            self.batch.append(msg)
        else:
            self.send(msg)


def _inval_inode_msg(nodeid: int, offset: int) -> bytes:
    return proto.pack_notify(proto.NOTIFY_INVAL_INODE, proto.NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, 0))
