"""FUSE operations on a served host directory (one instance per mounted session).

`Filesystem.dispatch(header, msg)` turns one FUSE request into one reply (bytes) or None (no reply).
It never raises: OSError becomes -errno, a malformed request becomes -EINVAL, anything else -EIO.

The guest, its kernel's permission checks included, is not trusted. The rules, whatever uid a request claims:

- Credentials: each request runs on a thread acting as the uid and gid of its fuse_in_header, with no
  supplementary groups (FUSE does not send them) and no capabilities (`sysc.act_as`): the host kernel checks
  it as that host uid without privilege. A request claiming uid 0 acts as host uid 0 with no capability:
  it has the owner's rights on root-owned files in the served tree and only the group/other bits on
  everyone else's; no DAC override, no chown, no chmod or utimes of others' files, no mknod of devices,
  no file capabilities. So guest root writes into a host user's directory only where its mode lets others.
- Never shown to the guest: `security.capability` (GETXATTR: ENODATA, LISTXATTR leaves it out). File
  capabilities mean nothing on the guest's nosuid mount, and the host's kernel strips them itself when the
  server writes the file; the guest relay answers the GETXATTR its kernel sends before every write from
  this rule, without a round trip (fcvm_wire.fusepipe.client).
- Never made on the host: a device node (MKNOD of a character or block device: EPERM; regular files, FIFOs
  and sockets are fine); a setuid or setgid bit (stripped from the mode of CREATE, MKNOD, MKDIR, TMPFILE
  and SETATTR, which then succeed without it, as if on a nosuid mount; a directory the host made setgid
  still passes its setgid bit on to new subdirectories, as the host's kernel does); a `security.*` or
  `trusted.*` xattr (SETXATTR and REMOVEXATTR: EPERM; reading them is fine).
- Names are single components resolved with *at() calls on held O_PATH fds, never following a host
  symlink (see inodes); node ids and file handles the server never issued are ESTALE / EBADF.
- Bounded: a READDIR reply is at most the requested size and one frame, read straight from the host
  directory (nothing is kept between requests); at most _MAX_LOCK_FDS lock fds (ENOLCK beyond); an
  INTERRUPT is remembered only for a lock request that is waiting; a directory is listed for the relay's
  hints (below) at most once per negative timeout, and only when it is small and watched.

Hints (for a relay that asked for them, see fcvm_wire.fusepipe.dircache): after each name operation, the
parent directory's attributes; with a negative LOOKUP, the directory's names; with a read-only OPEN of a file
of at most _STORE_MAX bytes that no other handle is open on, its content (the relay stores it in the guest's
page cache; see `_hint_store` for why only then). They are sent ahead of the reply and never kept in the reply
cache (a re-sent request gets none).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator

from fcvm.core import log
from fcvm.fusepipe import sysc
from fcvm.fusepipe.inodes import Inode, InodeTable
from fcvm.fusepipe.inval import Invalidator
from fcvm_wire.fusepipe import proto
from fcvm_wire.fusepipe.proto import InHeader

_log = log.get("fusepipe")

_HDR = proto.IN_HEADER.size
_OUT_HEADER_PACK = proto.OUT_HEADER.pack
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY
_SETID_BITS = stat.S_ISUID | stat.S_ISGID
_HOST_ONLY_XATTRS = (b"security.", b"trusted.")  # the host's LSM labels, file capabilities, admin data
_HIDDEN_XATTR = b"security.capability"  # never shown to the guest (see the module docstring)
_NODE_TYPES = frozenset({stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK})  # what MKNOD may make: no devices
_MAX_LISTED = 1024  # names in the largest directory whose listing goes to the relay (and directories listed
_MAX_LISTING_BYTES = 64 << 10  # within one negative timeout), and their size
_STORE_MAX = 64 << 10  # the largest file whose content goes to the relay with its read-only OPEN
_MAX_LOCK_FDS = 1024  # (inode, lock owner) pairs with a POSIX lock fd open, per session
_MAX_REPLY = proto.MAX_FRAME - proto.OUT_HEADER.size  # the largest payload one reply frame carries
_WRITE_OPS = frozenset({
    proto.SETATTR, proto.SYMLINK, proto.MKNOD, proto.MKDIR, proto.UNLINK, proto.RMDIR, proto.RENAME,
    proto.RENAME2, proto.LINK, proto.WRITE, proto.SETXATTR, proto.REMOVEXATTR, proto.CREATE,
    proto.FALLOCATE, proto.COPY_FILE_RANGE, proto.TMPFILE,
})
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200  # inotify event kinds
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on 64-bit Linux
F_OFD_GETLK, F_OFD_SETLK = 36, 37
_DT = {stat.S_IFDIR: 4, stat.S_IFREG: 8, stat.S_IFLNK: 10, stat.S_IFIFO: 1, stat.S_IFCHR: 2,
       stat.S_IFBLK: 6, stat.S_IFSOCK: 12}


class Malformed(Exception):
    pass


def _xattr_reply(size: int, data: bytes) -> bytes:
    """GETXATTR/LISTXATTR: a size-0 request probes for the length (fuse_getxattr_out); else the data, if it fits."""
    if size == 0:
        return struct.pack("<II", len(data), 0)
    if len(data) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return data


class Handle:
    """An open file or directory (a FUSE file handle)."""

    __slots__ = ("fd", "inode", "is_dir", "lock", "lock_owners")

    def __init__(self, fd: int, inode: Inode, is_dir: bool = False) -> None:
        self.fd = fd
        self.inode = inode
        self.is_dir = is_dir
        self.lock = threading.Lock()  # a directory's: its fd position, set by each READDIR
        self.lock_owners: set[int] | None = None  # POSIX lock owners that locked through this handle


def _name(raw: bytes) -> bytes:
    """Validate one path component from the guest: no escape via '..', '/', or an empty name."""
    if not raw or raw in (b".", b"..") or b"/" in raw:
        raise OSError(errno.EINVAL, "bad name")
    if len(raw) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return raw


def _guest_mode(mode: int) -> int:
    """The permission bits of a mode the guest asks for, less setuid and setgid (never set on the host)."""
    return stat.S_IMODE(mode) & ~_SETID_BITS


def _settable_xattr(name: bytes) -> bytes:
    if name.startswith(_HOST_ONLY_XATTRS):
        raise OSError(errno.EPERM, "security.* and trusted.* xattrs are the host's")
    return name


def _cstring(body: memoryview) -> bytes:
    """The one NUL-terminated string a request body starts with."""
    raw = bytes(body)
    nul = raw.find(b"\0")
    if nul < 0:
        raise Malformed("missing NUL-terminated string")
    return raw[:nul]


def _cstrings(body: bytes | memoryview, count: int) -> list[bytes]:
    parts = bytes(body).split(b"\0")
    if len(parts) < count + 1:
        raise Malformed("missing NUL-terminated string")
    return parts[:count]


def attr_tuple(st: os.stat_result) -> tuple[int, ...]:
    a, an = divmod(st.st_atime_ns, 1_000_000_000)
    m, mn = divmod(st.st_mtime_ns, 1_000_000_000)
    c, cn = divmod(st.st_ctime_ns, 1_000_000_000)
    rdev = st.st_rdev
    return (st.st_ino, st.st_size, st.st_blocks, a, m, c, an, mn, cn, st.st_mode, st.st_nlink,
            st.st_uid, st.st_gid, proto.encode_dev(rdev) if rdev else 0, st.st_blksize, 0)


class Filesystem:
    def __init__(self, root: str, *, read_only: bool = False, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0, negative_timeout: float = 1.0) -> None:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # Reopening an O_PATH fd goes through its /proc magic link; resolving it relative to an open
        # /proc/self/fd walks one component instead of four.
        self._proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_path = root
        self.read_only = read_only
        self.inodes = InodeTable(root_fd)
        self.handles: dict[int, Handle] = {}
        self.handles_lock = threading.Lock()
        self._next_fh = 1
        self.lock_fds: dict[tuple[int, int], int] = {}
        self.lock_pids: dict[tuple[int, int], int] = {}
        self.locks_lock = threading.Lock()
        # Lock requests that may wait (until answered) and, of those, the ones the guest interrupted: an
        # INTERRUPT for anything else is dropped, so neither set outgrows the lock waits in progress.
        self.interrupts_lock = threading.Lock()
        self.waiting: set[int] = set()
        self.interrupted: set[int] = set()
        self.proto_minor = proto.KERNEL_MINOR_VERSION
        self.expire_only = False
        self.initialized = False
        self._times = (self._timeout(entry_timeout), self._timeout(attr_timeout), self._timeout(negative_timeout))
        # How long the relay may use its hints: the attribute and negative timeouts, in ns.
        self._attr_ns, self._negative_ns = (sec * 1_000_000_000 + nsec for sec, nsec in self._times[1:])
        self.after_change: Callable[[Inode], None] | None = None
        # The relay takes hints (fcvm_wire.fusepipe.dircache): the reader thread's inline requests add them to
        # `hints`, and its session sends them ahead of the reply.
        self.hints_wanted = False
        self.hints: list[bytes] = []
        self.stores_safe = True  # every file the guest has open was opened through this server
        self._listed_until: dict[int, float] = {}  # directories not to list again before then
        # Told about each name operation done for the guest: the guest kernel knows about it, so its
        # inotify event needs no invalidation (see inval.Invalidator.expect).
        self.invalidator: Invalidator | None = None
        self._ops: dict[int, Callable[[InHeader, memoryview], bytes | None]] = {
            proto.INIT: self.op_init, proto.DESTROY: self.op_destroy, proto.LOOKUP: self.op_lookup,
            proto.FORGET: self.op_forget, proto.BATCH_FORGET: self.op_batch_forget,
            proto.GETATTR: self.op_getattr, proto.SETATTR: self.op_setattr, proto.READLINK: self.op_readlink,
            proto.SYMLINK: self.op_symlink, proto.MKNOD: self.op_mknod, proto.MKDIR: self.op_mkdir,
            proto.UNLINK: self.op_unlink, proto.RMDIR: self.op_rmdir, proto.RENAME: self.op_rename,
            proto.RENAME2: self.op_rename2, proto.LINK: self.op_link, proto.OPEN: self.op_open,
            proto.READ: self.op_read, proto.WRITE: self.op_write, proto.STATFS: self.op_statfs,
            proto.RELEASE: self.op_release, proto.FSYNC: self.op_fsync, proto.SETXATTR: self.op_setxattr,
            proto.GETXATTR: self.op_getxattr, proto.LISTXATTR: self.op_listxattr,
            proto.REMOVEXATTR: self.op_removexattr, proto.FLUSH: self.op_flush, proto.OPENDIR: self.op_opendir,
            proto.READDIR: self.op_readdir, proto.READDIRPLUS: self.op_readdirplus,
            proto.RELEASEDIR: self.op_releasedir, proto.FSYNCDIR: self.op_fsyncdir, proto.GETLK: self.op_getlk,
            proto.SETLK: self.op_setlk, proto.SETLKW: self.op_setlkw, proto.CREATE: self.op_create,
            proto.INTERRUPT: self.op_interrupt, proto.FALLOCATE: self.op_fallocate, proto.LSEEK: self.op_lseek,
            proto.COPY_FILE_RANGE: self.op_copy_file_range, proto.SYNCFS: self.op_syncfs,
            proto.TMPFILE: self.op_tmpfile,
        }

    @staticmethod
    def _timeout(seconds: float) -> tuple[int, int]:
        s = int(seconds)
        return s, int((seconds - s) * 1e9)

    def close(self) -> None:
        with self.handles_lock:
            handles = list(self.handles.values())
            self.handles.clear()
        for h in handles:
            _close(h.fd)
        with self.locks_lock:
            for fd in self.lock_fds.values():
                _close(fd)
            self.lock_fds.clear()
        self.inodes.close()
        _close(self._proc_fds)

    # ---- dispatch --------------------------------------------------------------------------------
    def dispatch(self, h: InHeader, msg: bytes) -> bytes | None:
        op = self._ops.get(h.opcode)
        try:
            if op is None:
                # Everything left is safe to refuse with ENOSYS: the kernel remembers and falls back
                # (ACCESS with default_permissions, BMAP, IOCTL, POLL, STATX, SETUPMAPPING...).
                return proto.pack_reply(h.unique, -errno.ENOSYS)
            if not self.initialized and h.opcode != proto.INIT:
                return proto.pack_reply(h.unique, -errno.EIO)
            if self.read_only and h.opcode in _WRITE_OPS:
                return proto.pack_reply(h.unique, -errno.EROFS)
            if h.opcode not in proto.NO_REPLY:  # FORGET and INTERRUPT touch no file: any uid may send them
                sysc.act_as(h.uid, h.gid)
            payload = op(h, memoryview(msg)[_HDR:])
            if payload is None:
                return None
            return _OUT_HEADER_PACK(16 + len(payload), 0, h.unique) + payload
        except OSError as exc:
            code = exc.errno or errno.EIO
            return None if h.opcode in proto.NO_REPLY else proto.pack_reply(h.unique, -code)
        except (Malformed, struct.error, ValueError, OverflowError) as exc:
            _log.debug("malformed %s request: %s", proto.OPCODE_NAMES.get(h.opcode, h.opcode), exc)
            return None if h.opcode in proto.NO_REPLY else proto.pack_reply(h.unique, -errno.EINVAL)
        except Exception:
            _log.exception("fuse-pipe: %s failed", proto.OPCODE_NAMES.get(h.opcode, h.opcode))
            return None if h.opcode in proto.NO_REPLY else proto.pack_reply(h.unique, -errno.EIO)

    # ---- helpers ---------------------------------------------------------------------------------
    def _entry(self, ino: Inode | None, st: os.stat_result | None) -> bytes:
        ev, av, nv = self._times
        if ino is None or st is None:  # negative entry, cached by the kernel for negative_timeout
            return proto.ENTRY_OUT.pack(0, 0, nv[0], 0, nv[1], 0, *([0] * 16))
        return proto.ENTRY_OUT.pack(ino.nodeid, 0, ev[0], av[0], ev[1], av[1], *attr_tuple(st))

    def _attr(self, st: os.stat_result) -> bytes:
        av = self._times[1]
        return proto.ATTR_OUT.pack(av[0], av[1], 0, *attr_tuple(st))

    def _lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self.inodes.add(fd, st), st

    def _adopt(self, fd: int) -> tuple[Inode, os.stat_result]:
        """Register the inode behind an open (non-O_PATH) fd we just created."""
        pfd = os.open(str(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc_fds)
        st = os.fstat(pfd)
        return self.inodes.add(pfd, st), st

    def _proc(self, ino: Inode) -> str:
        return f"/proc/self/fd/{ino.fd}"

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return h

    def _new_handle(self, fd: int, ino: Inode, is_dir: bool = False) -> int:
        with self.handles_lock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(fd, ino, is_dir)
            ino.opens += 1
        return fh

    def _drop_handle(self, fh: int) -> Handle | None:
        with self.handles_lock:
            handle = self.handles.pop(fh, None)
            if handle is not None:
                handle.inode.opens -= 1
        if handle is not None:
            _close(handle.fd)
        return handle

    def _reopen(self, ino: Inode, flags: int) -> int:
        if ino.fmt == stat.S_IFDIR:
            return os.open(".", flags | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ino.fd)
        if ino.fmt != stat.S_IFREG:
            # The kernel opens fifos, sockets and devices itself; reopening a symlink through
            # /proc would follow it on the host.
            raise OSError(errno.EINVAL if ino.fmt != stat.S_IFLNK else errno.ELOOP, "not a regular file")
        return os.open(str(ino.fd), flags | os.O_CLOEXEC, dir_fd=self._proc_fds)

    @contextlib.contextmanager
    def _own_events(self, *expected: tuple[Inode, bytes, int]) -> Iterator[None]:
        """Around a syscall of ours: the inotify events it causes (parent, name, kind) are not sent back to the
        guest as invalidations; if the syscall fails, nothing is suppressed."""
        inv = self.invalidator
        if inv is None:
            yield
            return
        registered = [inv.expect(parent, name, kind) for parent, name, kind in expected]
        try:
            yield
        except BaseException:
            for e in registered:
                inv.done(e, False)
            raise
        for e in registered:
            inv.done(e, True)

    def _changed(self, ino: Inode) -> None:
        if self.after_change is not None:
            self.after_change(ino)

    # ---- session ---------------------------------------------------------------------------------
    def op_init(self, h: InHeader, b: memoryview) -> bytes:
        major, minor, max_readahead, flags = struct.unpack_from("<IIII", b, 0)
        flags2 = 0
        if major != proto.KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"unsupported FUSE major {major}")
        if minor < 31:
            raise OSError(errno.EPROTO, f"FUSE 7.{minor} is too old (need 7.31)")
        if flags & proto.INIT_EXT and len(b) >= 20:
            flags2 = struct.unpack_from("<I", b, 16)[0]
        kernel = flags | (flags2 << 32)
        want = (proto.ASYNC_READ | proto.POSIX_LOCKS | proto.ATOMIC_O_TRUNC | proto.BIG_WRITES
                | proto.FLOCK_LOCKS | proto.AUTO_INVAL_DATA | proto.DO_READDIRPLUS | proto.ASYNC_DIO
                | proto.PARALLEL_DIROPS | proto.MAX_PAGES | proto.CACHE_SYMLINKS | proto.INIT_EXT
                | proto.HAS_EXPIRE_ONLY)
        got = kernel & want
        self.proto_minor = min(minor, proto.KERNEL_MINOR_VERSION)
        self.expire_only = bool(got & proto.HAS_EXPIRE_ONLY)
        self.initialized = True
        return proto.INIT_OUT.pack(proto.KERNEL_VERSION, self.proto_minor, max_readahead, got & 0xFFFFFFFF,
                                   64, 48, proto.MAX_WRITE, 1, proto.MAX_PAGES, 0, got >> 32)

    def adopt(self) -> None:
        """Serve a mount whose FUSE_INIT another server answered (a snapshot restored as a clone): the guest
        kernel negotiated what this server offers, and nothing else needs to be known."""
        self.proto_minor = proto.KERNEL_MINOR_VERSION
        self.initialized = True
        self.stores_safe = False

    def op_destroy(self, h: InHeader, b: memoryview) -> bytes:
        return b""

    def accept_interrupts(self, unique: int) -> None:
        """Request `unique` is a lock request that may wait: an INTERRUPT for it is kept until it is answered.
        The server calls this before handing the request to its thread, so an INTERRUPT read right after it
        is not lost."""
        with self.interrupts_lock:
            self.waiting.add(unique)

    def op_interrupt(self, h: InHeader, b: memoryview) -> None:
        (unique,) = struct.unpack_from("<Q", b, 0)
        with self.interrupts_lock:
            if unique in self.waiting:
                self.interrupted.add(unique)
        return None

    # ---- names -----------------------------------------------------------------------------------
    def op_lookup(self, h: InHeader, b: memoryview) -> bytes:
        name = _cstring(b)
        parent = self.inodes.get(h.nodeid)
        try:
            ino, st = self._lookup(parent, _name(name))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                with contextlib.suppress(OSError):  # a directory this uid cannot read is not listed
                    self._hint_names(h.unique, parent)
                return self._entry(None, None)
            raise
        return self._entry(ino, st)

    def op_forget(self, h: InHeader, b: memoryview) -> None:
        (n,) = struct.unpack_from("<Q", b, 0)
        self.inodes.forget(h.nodeid, n)
        return None

    def op_batch_forget(self, h: InHeader, b: memoryview) -> None:
        (count,) = struct.unpack_from("<I", b, 0)
        count = min(count, (len(b) - 8) // 16)
        for i in range(count):
            nodeid, n = struct.unpack_from("<QQ", b, 8 + 16 * i)
            self.inodes.forget(nodeid, n)
        return None

    def op_getattr(self, h: InHeader, b: memoryview) -> bytes:
        flags, _, fh = struct.unpack_from("<IIQ", b, 0)
        if flags & proto.GETATTR_FH and fh in self.handles:
            return self._attr(os.fstat(self.handles[fh].fd))
        return self._attr(os.fstat(self.inodes.get(h.nodeid).fd))

    def op_setattr(self, h: InHeader, b: memoryview) -> bytes:
        (valid, _, fh, size, _lock_owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec, mode,
         _, uid, gid) = struct.unpack_from("<IIQQQQQQIIIIIII", b, 0)
        ino = self.inodes.get(h.nodeid)
        hfd = self.handles[fh].fd if valid & proto.FATTR_FH and fh in self.handles else None
        is_link = ino.fmt == stat.S_IFLNK
        effective = (proto.FATTR_UID | proto.FATTR_GID | proto.FATTR_SIZE | proto.FATTR_MODE | proto.FATTR_ATIME
                     | proto.FATTR_MTIME | proto.FATTR_KILL_SUIDGID)
        if not valid & effective:
            # chown(f, -1, -1) and friends: nothing to change but the ctime, as on the host.
            sysc.fchown_empty(ino.fd, -1, -1)
        if valid & (proto.FATTR_UID | proto.FATTR_GID):
            u = uid if valid & proto.FATTR_UID else -1
            g = gid if valid & proto.FATTR_GID else -1
            if hfd is not None:
                os.fchown(hfd, u, g)
            else:
                sysc.fchown_empty(ino.fd, u, g)
        if valid & proto.FATTR_SIZE:
            if ino.fmt != stat.S_IFREG:
                raise OSError(errno.EISDIR if ino.is_dir else errno.EINVAL, "truncate")
            if hfd is not None:
                os.ftruncate(hfd, size)
            else:
                os.truncate(self._proc(ino), size)
        if valid & proto.FATTR_MODE:
            if is_link:
                raise OSError(errno.EOPNOTSUPP, "chmod on a symlink")
            if hfd is not None:
                os.fchmod(hfd, _guest_mode(mode))
            else:
                os.chmod(self._proc(ino), _guest_mode(mode))
        elif valid & proto.FATTR_KILL_SUIDGID and ino.fmt == stat.S_IFREG:
            st = os.fstat(ino.fd)
            kill = stat.S_ISUID | (stat.S_ISGID if st.st_mode & stat.S_IXGRP else 0)
            if st.st_mode & kill:
                os.chmod(self._proc(ino), stat.S_IMODE(st.st_mode) & ~kill)
        if valid & (proto.FATTR_ATIME | proto.FATTR_MTIME):
            omit = (0, sysc.UTIME_OMIT)
            now = (0, sysc.UTIME_NOW)
            at = omit
            mt = omit
            if valid & proto.FATTR_ATIME:
                at = now if valid & proto.FATTR_ATIME_NOW else (_s64(atime), atimensec)
            if valid & proto.FATTR_MTIME:
                mt = now if valid & proto.FATTR_MTIME_NOW else (_s64(mtime), mtimensec)
            sysc.utimensat_empty(hfd if hfd is not None else ino.fd, at, mt, nofollow=is_link)
        self._changed(ino)
        return self._attr(os.fstat(hfd if hfd is not None else ino.fd))

    def op_readlink(self, h: InHeader, b: memoryview) -> bytes:
        ino = self.inodes.get(h.nodeid)
        return os.fsencode(os.readlink("", dir_fd=ino.fd)) if ino.fmt == stat.S_IFLNK else _raise(errno.EINVAL)

    def _created(self, h: InHeader, parent: Inode, name: bytes) -> bytes:
        ino, st = self._lookup(parent, name)
        self._changed(parent)
        self._hint_attrs(h.unique, parent)
        return self._entry(ino, st)

    # ---- hints to the relay (see fcvm_wire.fusepipe.dircache) -------------------------------------
    def _hint_attrs(self, unique: int, parent: Inode) -> None:
        """After a name operation in `parent`: its attributes now, which its next GETATTR would fetch."""
        valid = self._attr_ns
        if self.hints_wanted and valid:
            head = proto.HINT_HEAD.pack(parent.nodeid, unique, valid)
            self.hints.append(proto.pack_notify(proto.HINT_DIR_ATTR, head + self._attr(os.fstat(parent.fd))))

    def _hint_store(self, unique: int, ino: Inode, fd: int) -> None:
        """With a read-only OPEN of a small file no other handle is open on: its content, which the relay puts
        in the guest's page cache before the reply (its first read then needs no round trip). Only then: the
        relay writes it to /dev/fuse from its loop, and the kernel would block that write on a page a READ
        in flight has locked, waiting for the loop itself; with no other open file there is no such READ
        (after `adopt`, the guest may hold files this server never opened: no stores)."""
        if not (self.hints_wanted and self.stores_safe and ino.opens == 1):
            return
        with contextlib.suppress(OSError):  # the OPEN has succeeded (its handle exists) whatever happens here
            size = os.fstat(fd).st_size
            if 0 < size <= _STORE_MAX:
                data = os.pread(fd, size, 0)
                head = proto.HINT_HEAD.pack(ino.nodeid, unique, 0)
                self.hints.append(proto.pack_notify(proto.HINT_STORE, head + data))

    def _hint_names(self, unique: int, parent: Inode) -> None:
        """With a negative LOOKUP: every name in `parent`, if it is watched (its host-side changes reach the
        relay as notifications, which is what keeps the list true) and not too large to send. A directory is
        listed at most once per negative timeout (a relay that lost or refused the list asks the server until
        then), so a guest cannot make the server read large directories over and over."""
        valid = self._negative_ns
        if not (self.hints_wanted and valid and parent.wd >= 0 and self.invalidator is not None):
            return
        now = time.monotonic()
        if self._listed_until.get(parent.nodeid, 0.0) > now:
            return
        if len(self._listed_until) >= _MAX_LISTED:
            self._listed_until = {n: t for n, t in self._listed_until.items() if t > now}
            if len(self._listed_until) >= _MAX_LISTED:
                return
        self._listed_until[parent.nodeid] = now + valid / 1e9
        names: list[bytes] = []
        size = 0
        fd = self._reopen(parent, os.O_RDONLY)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = os.fsencode(entry.name)
                    size += len(name) + 1
                    if len(names) == _MAX_LISTED or size > _MAX_LISTING_BYTES:
                        return
                    names.append(name)
        finally:
            os.close(fd)
        body = proto.HINT_HEAD.pack(parent.nodeid, unique, valid) + b"".join(n + b"\0" for n in names)
        self.hints.append(proto.pack_notify(proto.HINT_DIR_NAMES, body))

    def op_symlink(self, h: InHeader, b: memoryview) -> bytes:
        name, target = _cstrings(b, 2)
        parent = self.inodes.get(h.nodeid)
        with self._own_events((parent, name, IN_CREATE)):
            os.symlink(target, _name(name), dir_fd=parent.fd)
        return self._created(h, parent, name)

    def op_mknod(self, h: InHeader, b: memoryview) -> bytes:
        mode, rdev, _umask, _ = struct.unpack_from("<IIII", b, 0)
        (name,) = _cstrings(b[16:], 1)
        parent = self.inodes.get(h.nodeid)
        major, minor = proto.decode_dev(rdev)
        fmt = stat.S_IFMT(mode)
        if fmt not in _NODE_TYPES:
            raise OSError(errno.EPERM, "no device nodes on the host")
        with self._own_events((parent, name, IN_CREATE)), sysc.exact_modes():
            if fmt == stat.S_IFREG:
                fd = os.open(_name(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                             _guest_mode(mode), dir_fd=parent.fd)
                os.close(fd)
            else:
                os.mknod(_name(name), fmt | _guest_mode(mode), os.makedev(major, minor), dir_fd=parent.fd)
        return self._created(h, parent, name)

    def op_mkdir(self, h: InHeader, b: memoryview) -> bytes:
        mode, _umask = struct.unpack_from("<II", b, 0)
        (name,) = _cstrings(b[8:], 1)
        parent = self.inodes.get(h.nodeid)
        with self._own_events((parent, name, IN_CREATE)), sysc.exact_modes():
            os.mkdir(_name(name), _guest_mode(mode), dir_fd=parent.fd)
        return self._created(h, parent, name)

    def op_unlink(self, h: InHeader, b: memoryview) -> bytes:
        return self._remove(h, b, os.unlink)

    def op_rmdir(self, h: InHeader, b: memoryview) -> bytes:
        return self._remove(h, b, os.rmdir)

    def _remove(self, h: InHeader, b: memoryview, remove: Callable[..., None]) -> bytes:
        (name,) = _cstrings(b, 1)
        parent = self.inodes.get(h.nodeid)
        with self._own_events((parent, name, IN_DELETE)):
            remove(_name(name), dir_fd=parent.fd)
        self._changed(parent)
        self._hint_attrs(h.unique, parent)
        return b""

    def _rename(self, h: InHeader, newdir: int, flags: int, names: memoryview) -> bytes:
        old, new = _cstrings(names, 2)
        src = self.inodes.get(h.nodeid)
        dst = self.inodes.get(newdir)
        with self._own_events((src, old, IN_MOVED_FROM), (dst, new, IN_MOVED_TO)):
            if flags:
                sysc.renameat2(src.fd, _name(old), dst.fd, _name(new), flags)
            else:
                os.rename(_name(old), _name(new), src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        self._changed(src)
        self._hint_attrs(h.unique, src)
        if dst is not src:
            self._changed(dst)
            self._hint_attrs(h.unique, dst)
        return b""

    def op_rename(self, h: InHeader, b: memoryview) -> bytes:
        (newdir,) = struct.unpack_from("<Q", b, 0)
        return self._rename(h, newdir, 0, b[8:])

    def op_rename2(self, h: InHeader, b: memoryview) -> bytes:
        newdir, flags, _ = struct.unpack_from("<QII", b, 0)
        return self._rename(h, newdir, flags, b[16:])

    def op_link(self, h: InHeader, b: memoryview) -> bytes:
        (oldnode,) = struct.unpack_from("<Q", b, 0)
        (name,) = _cstrings(b[8:], 1)
        parent = self.inodes.get(h.nodeid)
        src = self.inodes.get(oldnode)
        if src.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        with self._own_events((parent, name, IN_CREATE)):
            sysc.link_empty(src.fd, parent.fd, _name(name))
        return self._created(h, parent, name)

    # ---- files -----------------------------------------------------------------------------------
    def op_open(self, h: InHeader, b: memoryview) -> bytes:
        flags, _open_flags = struct.unpack_from("<II", b, 0)
        ino = self.inodes.get(h.nodeid)
        flags &= ~_OPEN_STRIP
        if self.read_only and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only")
        fd = self._reopen(ino, flags)
        fh = self._new_handle(fd, ino)
        if flags & os.O_TRUNC:
            self._changed(ino)
        elif flags & (os.O_ACCMODE | os.O_DIRECT) == os.O_RDONLY:
            self._hint_store(h.unique, ino, fd)
        # A read-only open has nothing to flush: skip the FLUSH round trip on close. POSIX locks taken
        # through it are dropped at RELEASE instead (see op_release).
        open_flags = proto.FOPEN_KEEP_CACHE
        if flags & os.O_ACCMODE == os.O_RDONLY:
            open_flags |= proto.FOPEN_NOFLUSH
        return proto.OPEN_OUT.pack(fh, open_flags, 0)

    def op_create(self, h: InHeader, b: memoryview) -> bytes:
        flags, mode, _umask, _ = struct.unpack_from("<IIII", b, 0)
        (name,) = _cstrings(b[16:], 1)
        parent = self.inodes.get(h.nodeid)
        with self._own_events((parent, name, IN_CREATE)), sysc.exact_modes():
            fd = os.open(_name(name), (flags & ~os.O_NOCTTY) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         _guest_mode(mode), dir_fd=parent.fd)
        reply = self._opened_new(fd, proto.FOPEN_KEEP_CACHE)
        self._changed(parent)
        self._hint_attrs(h.unique, parent)
        return reply

    def op_tmpfile(self, h: InHeader, b: memoryview) -> bytes:
        flags, mode, _umask, _ = struct.unpack_from("<IIII", b, 0)
        parent = self.inodes.get(h.nodeid)
        flags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECTORY)) | os.O_TMPFILE | os.O_CLOEXEC
        if flags & os.O_ACCMODE == os.O_RDONLY:
            flags |= os.O_RDWR
        with sysc.exact_modes():
            fd = os.open(".", flags, _guest_mode(mode), dir_fd=parent.fd)
        return self._opened_new(fd, 0)

    def _opened_new(self, fd: int, open_flags: int) -> bytes:
        """CREATE and TMPFILE: the inode behind the new open `fd` (owned from here on) and a handle on it; the
        entry and open reply."""
        try:
            ino, st = self._adopt(fd)
        except BaseException:
            os.close(fd)
            raise
        fh = self._new_handle(fd, ino)
        return self._entry(ino, st) + proto.OPEN_OUT.pack(fh, open_flags, 0)

    def op_read(self, h: InHeader, b: memoryview) -> bytes:
        fh, offset, size = struct.unpack_from("<QQI", b, 0)
        return os.pread(self._handle(fh).fd, min(size, proto.MAX_WRITE), offset)

    def op_write(self, h: InHeader, b: memoryview) -> bytes:
        fh, offset, size, write_flags = struct.unpack_from("<QQII", b, 0)
        data = b[40:40 + size]
        if len(data) != size:
            raise Malformed("short write payload")
        handle = self._handle(fh)
        n = os.pwrite(handle.fd, data, offset)
        if write_flags & proto.WRITE_KILL_SUIDGID:
            st = os.fstat(handle.fd)
            kill = stat.S_ISUID | (stat.S_ISGID if st.st_mode & stat.S_IXGRP else 0)
            if st.st_mode & kill:
                os.fchmod(handle.fd, stat.S_IMODE(st.st_mode) & ~kill)
        return struct.pack("<II", n, 0)

    def op_statfs(self, h: InHeader, b: memoryview) -> bytes:
        s = os.fstatvfs(self.inodes.get(h.nodeid).fd)
        return proto.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                                  s.f_namemax, s.f_frsize, 0)

    def op_release(self, h: InHeader, b: memoryview) -> bytes:
        fh, _flags, _release_flags, lock_owner = struct.unpack_from("<QIIQ", b, 0)
        handle = self._drop_handle(fh)
        if handle is not None and self.lock_fds:
            for owner in {lock_owner, *(handle.lock_owners or ())}:
                self._drop_lock_fd(handle.inode.nodeid, owner)
        return b""

    def op_flush(self, h: InHeader, b: memoryview) -> bytes:
        fh, _, _, lock_owner = struct.unpack_from("<QIIQ", b, 0)
        handle = self._handle(fh)
        # close(dup(fd)) reports delayed write errors (NFS-style), like close(2) on the host would;
        # closing the owner's lock fd drops its POSIX locks, as close(2) does.
        os.close(os.dup(handle.fd))
        if self.lock_fds:
            self._drop_lock_fd(handle.inode.nodeid, lock_owner)
        return b""

    def fsync_target(self, msg: bytes) -> tuple[int, bool] | None:
        """For the session's sync groups (fcvm.fusepipe.syncgroup), the open handle an FSYNC names: a duplicate of
        its fd (the caller's to close; the handle's own may be released, and its number reused, before the group
        syncs) and whether fdatasync is asked for. An open fd needs no credentials. None: the request goes through
        `dispatch`."""
        if not self.initialized or len(msg) < _HDR + 12:
            return None
        fh, flags = struct.unpack_from("<QI", msg, _HDR)
        handle = self.handles.get(fh)
        if handle is None:
            return None
        try:
            fd = fcntl.fcntl(handle.fd, fcntl.F_DUPFD_CLOEXEC, 0)
        except OSError:  # no fd to spare: dispatch's fsync needs none
            return None
        return fd, bool(flags & proto.FSYNC_FDATASYNC)

    def op_fsync(self, h: InHeader, b: memoryview) -> bytes:
        fh, flags = struct.unpack_from("<QI", b, 0)
        handle = self.handles.get(fh)
        if handle is None:
            fd = self._reopen(self.inodes.get(h.nodeid), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return b""
        (os.fdatasync if flags & proto.FSYNC_FDATASYNC else os.fsync)(handle.fd)
        return b""

    def op_fsyncdir(self, h: InHeader, b: memoryview) -> bytes:
        return self.op_fsync(h, b)

    def op_syncfs(self, h: InHeader, b: memoryview) -> bytes:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.inodes.root.fd)
        try:
            os.fsync(fd)
            os.sync()
        finally:
            os.close(fd)
        return b""

    def op_fallocate(self, h: InHeader, b: memoryview) -> bytes:
        fh, offset, length, mode = struct.unpack_from("<QQQI", b, 0)
        sysc.fallocate(self._handle(fh).fd, mode, offset, length)
        self._changed(self.inodes.get(h.nodeid))
        return b""

    def op_lseek(self, h: InHeader, b: memoryview) -> bytes:
        fh, offset, whence = struct.unpack_from("<QqI", b, 0)
        return struct.pack("<q", os.lseek(self._handle(fh).fd, offset, whence))

    def op_copy_file_range(self, h: InHeader, b: memoryview) -> bytes:
        fh_in, off_in, _nodeid_out, fh_out, off_out, length, _flags = struct.unpack_from("<QQQQQQQ", b, 0)
        n = os.copy_file_range(self._handle(fh_in).fd, self._handle(fh_out).fd, min(length, 1 << 30),
                               off_in, off_out)
        return struct.pack("<II", n, 0)

    # ---- xattrs ----------------------------------------------------------------------------------
    def _xattr_path(self, ino: Inode) -> str:
        if ino.fmt == stat.S_IFLNK:
            raise OSError(errno.EPERM, "xattrs on symlinks are not supported")
        return self._proc(ino)

    def op_setxattr(self, h: InHeader, b: memoryview) -> bytes:
        size, flags = struct.unpack_from("<II", b, 0)
        rest = bytes(b[8:])
        nul = rest.find(b"\0")
        if nul < 0 or len(rest) < nul + 1 + size:
            raise Malformed("setxattr")
        name, value = rest[:nul], rest[nul + 1:nul + 1 + size]
        ino = self.inodes.get(h.nodeid)
        if ino.fmt == stat.S_IFLNK:
            raise OSError(errno.EPERM, "xattrs on symlinks are not supported")
        os.setxattr(self._proc(ino), _settable_xattr(name), value, flags)
        self._changed(ino)
        return b""

    def op_getxattr(self, h: InHeader, b: memoryview) -> bytes:
        size, _ = struct.unpack_from("<II", b, 0)
        (name,) = _cstrings(b[8:], 1)
        ino = self.inodes.get(h.nodeid)
        if ino.fmt == stat.S_IFLNK or name == _HIDDEN_XATTR:
            raise OSError(errno.ENODATA, "no such xattr for the guest")
        return _xattr_reply(size, os.getxattr(self._proc(ino), name))

    def op_listxattr(self, h: InHeader, b: memoryview) -> bytes:
        size, _ = struct.unpack_from("<II", b, 0)
        ino = self.inodes.get(h.nodeid)
        names = [] if ino.fmt == stat.S_IFLNK else os.listxattr(self._proc(ino))
        listed = (os.fsencode(n) for n in names)
        return _xattr_reply(size, b"".join(n + b"\0" for n in listed if n != _HIDDEN_XATTR))

    def op_removexattr(self, h: InHeader, b: memoryview) -> bytes:
        (name,) = _cstrings(b, 1)
        ino = self.inodes.get(h.nodeid)
        os.removexattr(self._xattr_path(ino), _settable_xattr(name))
        self._changed(ino)
        return b""

    # ---- directories -----------------------------------------------------------------------------
    def op_opendir(self, h: InHeader, b: memoryview) -> bytes:
        ino = self.inodes.get(h.nodeid)
        if not ino.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        fd = self._reopen(ino, os.O_RDONLY)
        return proto.OPEN_OUT.pack(self._new_handle(fd, ino, is_dir=True), 0, 0)

    def op_releasedir(self, h: InHeader, b: memoryview) -> bytes:
        (fh,) = struct.unpack_from("<Q", b, 0)
        self._drop_handle(fh)
        return b""

    def _dir_entries(self, handle: Handle, offset: int, size: int) -> list[tuple[int, int, int, bytes]]:
        """The host directory's entries from `offset` on (0, or the offset the previous reply gave its last
        entry), about `size` bytes' worth, read straight from the directory: nothing is kept between
        requests. Caller holds handle.lock (the fd's position)."""
        os.lseek(handle.fd, offset, os.SEEK_SET)
        entries = sysc.getdents(handle.fd, max(size, sysc.DIRENT64_MAX))
        if handle.inode is self.inodes.root:  # the root's ".." is itself: nothing of the host's parent shows
            root_ino = self.inodes.root.key[1]
            entries = [(root_ino if name == b".." else ino, off, dt, name) for ino, off, dt, name in entries]
        return entries

    def op_readdir(self, h: InHeader, b: memoryview) -> bytes:
        fh, offset, size = struct.unpack_from("<QQI", b, 0)
        size = min(size, _MAX_REPLY)
        handle = self._handle(fh)
        out = bytearray()
        with handle.lock:
            for ino, next_offset, dt, name in self._dir_entries(handle, offset, size):
                rec = proto.DIRENT.pack(ino, next_offset, len(name), dt) + name
                rec += b"\0" * (-len(rec) % 8)
                if len(out) + len(rec) > size:
                    break
                out += rec
        return bytes(out)

    def op_readdirplus(self, h: InHeader, b: memoryview) -> bytes:
        fh, offset, size = struct.unpack_from("<QQI", b, 0)
        size = min(size, _MAX_REPLY)
        handle = self._handle(fh)
        parent = handle.inode
        out = bytearray()
        with handle.lock:
            for ino_num, next_offset, dt, name in self._dir_entries(handle, offset, size):
                reclen = proto.ENTRY_OUT.size + proto.DIRENT.size + len(name)
                reclen += -reclen % 8
                if len(out) + reclen > size:
                    break
                if name in (b".", b".."):
                    entry = self._entry(None, None)
                else:
                    try:
                        ino, st = self._lookup(parent, name)
                    except OSError:
                        continue  # vanished since it was read
                    entry = self._entry(ino, st)
                    ino_num = st.st_ino
                    dt = _DT.get(stat.S_IFMT(st.st_mode), 0)
                rec = entry + proto.DIRENT.pack(ino_num, next_offset, len(name), dt) + name
                rec += b"\0" * (-len(rec) % 8)
                out += rec
        return bytes(out)

    # ---- locks -----------------------------------------------------------------------------------
    def _lock_fd(self, ino: Inode, owner: int, create: bool) -> int | None:
        key = (ino.nodeid, owner)
        with self.locks_lock:
            fd = self.lock_fds.get(key)
            if fd is not None or not create:
                return fd
            if len(self.lock_fds) >= _MAX_LOCK_FDS:
                raise OSError(errno.ENOLCK, "too many lock owners")
        fd = None
        for flags in (os.O_RDWR, os.O_RDONLY, os.O_WRONLY):
            try:
                fd = self._reopen(ino, flags)
                break
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                    raise
        if fd is None:
            raise OSError(errno.EACCES, "cannot open file for locking")
        with self.locks_lock:
            old = self.lock_fds.get(key)
            if old is not None:
                os.close(fd)
                return old
            self.lock_fds[key] = fd
            return fd

    def _drop_lock_fd(self, nodeid: int, owner: int) -> None:
        with self.locks_lock:
            fd = self.lock_fds.pop((nodeid, owner), None)
            self.lock_pids.pop((nodeid, owner), None)
        if fd is not None:
            _close(fd)

    @staticmethod
    def _flock_struct(start: int, end: int, typ: int) -> bytes:
        length = 0 if end >= proto.OFFSET_MAX else end - start + 1
        return _FLOCK.pack(typ, os.SEEK_SET, start, length, 0)

    def op_getlk(self, h: InHeader, b: memoryview) -> bytes:
        _fh, owner, start, end, typ, _pid, _lk_flags, _ = proto.LK_IN.unpack_from(b, 0)
        ino = self.inodes.get(h.nodeid)
        fd = self._lock_fd(ino, owner, create=True)
        assert fd is not None
        res = fcntl.fcntl(fd, F_OFD_GETLK, self._flock_struct(start, end, typ))
        rtype, _, rstart, rlen, _ = _FLOCK.unpack(res)
        if rtype == fcntl.F_UNLCK:
            return proto.FILE_LOCK.pack(0, 0, fcntl.F_UNLCK, 0)
        rend = proto.OFFSET_MAX if rlen == 0 else rstart + rlen - 1
        pid = 0
        with self.locks_lock:
            others = [p for (n, o), p in self.lock_pids.items() if n == ino.nodeid and o != owner]
        if len(others) == 1:
            pid = others[0]
        return proto.FILE_LOCK.pack(rstart, rend, rtype, pid)

    def op_setlk(self, h: InHeader, b: memoryview) -> bytes:
        return self._setlk(h, b, wait=False)

    def op_setlkw(self, h: InHeader, b: memoryview) -> bytes:
        self.accept_interrupts(h.unique)
        try:
            return self._setlk(h, b, wait=True)
        finally:
            with self.interrupts_lock:
                self.waiting.discard(h.unique)
                self.interrupted.discard(h.unique)

    def _setlk(self, h: InHeader, b: memoryview, wait: bool) -> bytes:
        fh, owner, start, end, typ, pid, lk_flags, _ = proto.LK_IN.unpack_from(b, 0)
        ino = self.inodes.get(h.nodeid)
        if lk_flags & proto.LK_FLOCK:
            handle = self._handle(fh)
            op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(typ, fcntl.LOCK_UN)
            if op == fcntl.LOCK_UN:
                fcntl.flock(handle.fd, op)
                return b""
            self._retry(h.unique, wait, lambda: fcntl.flock(handle.fd, op | fcntl.LOCK_NB))
            return b""
        if typ == fcntl.F_UNLCK:
            fd = self._lock_fd(ino, owner, create=False)
            if fd is not None:
                fcntl.fcntl(fd, F_OFD_SETLK, self._flock_struct(start, end, typ))
            return b""
        fd = self._lock_fd(ino, owner, create=True)
        assert fd is not None
        via = self.handles.get(fh)
        if via is not None:
            if via.lock_owners is None:
                via.lock_owners = set()
            via.lock_owners.add(owner)
        arg = self._flock_struct(start, end, typ)
        self._retry(h.unique, wait, lambda: fcntl.fcntl(fd, F_OFD_SETLK, arg))
        with self.locks_lock:
            self.lock_pids[(ino.nodeid, owner)] = pid
        return b""

    def _retry(self, unique: int, wait: bool, attempt: Callable[[], object]) -> None:
        """Non-blocking attempts with backoff: a waiting lock stays interruptible (FUSE_INTERRUPT)."""
        delay = 0.0005
        while True:
            try:
                attempt()
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) or not wait:
                    raise
            if unique in self.interrupted:
                raise OSError(errno.EINTR, "interrupted")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _raise(err: int) -> bytes:
    raise OSError(err, os.strerror(err))


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
