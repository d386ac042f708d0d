"""FUSE kernel wire format (the subset fuse-pipe needs on both sides) and the fuse-pipe stream framing.

Framing: after a fixed-size HELLO exchange, the stream carries raw FUSE messages in both directions.
Every FUSE message starts with its own little-endian u32 length (`fuse_in_header.len` for requests,
`fuse_out_header.len` for replies and notifications), so no extra framing is needed and many requests can
be in flight at once, matched by `unique`. Server->client messages with `unique == 0` are notifications
(`error` holds the notify code).

HELLO (client -> server, 24 bytes): magic b"FPIPE\\x01\\0\\0", u64 session id, u32 flags, u32 reserved.
HELLO_OK (server -> client, 16 bytes): magic, u32 status (HELLO_STATUS_OK, or HELLO_BUSY: the server has as
many sessions as it takes, try again later), u32 resumed (1 if the session was known).
A client that reconnects sends the same session id and re-sends every request that got no reply; the
server answers duplicates from its reply cache (or lets the pending request answer on the new stream).

Standard library only: this module is copied into the guest.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# --- protocol versions -----------------------------------------------------------------------------
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38  # highest minor we speak; we answer INIT with min(kernel's, ours)
ROOT_ID = 1

# --- opcodes ----------------------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52

OPCODE_NAMES = {v: k for k, v in dict(globals()).items() if isinstance(v, int) and k.isupper() and 0 < v < 64
                and k not in ("KERNEL_VERSION", "KERNEL_MINOR_VERSION", "ROOT_ID")}

# Requests the kernel never expects an answer to.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# --- notify codes -----------------------------------------------------------------------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_STORE = 4
NOTIFY_DELETE = 6
EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags
# fuse-pipe's own notifications, server to relay only (never written to /dev/fuse; see dircache): a
# HINT_HEAD (directory node id, the unique of the request it came with, validity in ns), then for DIR_ATTR a
# fuse_attr_out, for DIR_NAMES every name in the directory, each NUL-terminated.
HINT_DIR_ATTR = 1001
HINT_DIR_NAMES = 1002
HINTS = frozenset({HINT_DIR_ATTR, HINT_DIR_NAMES})
# With the reply to a read-only OPEN: HINT_HEAD (the file's node id, the OPEN's unique, 0), then the file's
# whole content, which the relay stores in the guest's page cache (NOTIFY_STORE) before the reply reaches it.
HINT_STORE = 1003

# --- INIT flags -------------------------------------------------------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
HAS_EXPIRE_ONLY = 1 << 35

# --- other flag values ------------------------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5

GETATTR_FH = 1 << 0
LK_FLOCK = 1 << 0
FSYNC_FDATASYNC = 1 << 0
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
INT_REQ_BIT = 1

OFFSET_MAX = 0x7FFFFFFFFFFFFFFF

# --- structs ----------------------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2 (flags2 only with INIT_EXT)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
OPEN_OUT = struct.Struct("<QII")
DIRENT = struct.Struct("<QQII")  # ino off namelen type
KSTATFS = struct.Struct("<QQQQQIIII24x")
FILE_LOCK = struct.Struct("<QQII")
LK_IN = struct.Struct("<QQQQIIII")  # fh owner start end type pid lk_flags padding
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")
NOTIFY_DELETE_OUT = struct.Struct("<QQII")
NOTIFY_STORE_OUT = struct.Struct("<QQII")
HINT_HEAD = struct.Struct("<QQQ")

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104 and INIT_OUT.size == 64 and KSTATFS.size == 80

# --- fuse-pipe stream framing -----------------------------------------------------------------------
MAGIC = b"FPIPE\x01\x00\x00"
HELLO = struct.Struct("<8sQII")
HELLO_OK = struct.Struct("<8sII")
HELLO_FLAG_READ_ONLY = 1 << 0
# The client's kernel mount finished FUSE_INIT long ago: a server that does not know the session (a snapshot's
# guest restored as a clone, talking to the clone's own server) adopts it as initialized instead of refusing it.
HELLO_FLAG_INITIALIZED = 1 << 1
HELLO_FLAG_HINTS = 1 << 2  # the client takes HINT_* notifications
HELLO_STATUS_OK = 0
HELLO_BUSY = 1

MAX_WRITE = 1 << 20  # negotiated max_write (with FUSE_MAX_PAGES, 256 pages)
MAX_PAGES = 256
# Largest message either side may send: a WRITE request carries max_write bytes plus headers;
# a READ reply carries max_pages * page size.
MAX_FRAME = MAX_WRITE + 4096
MIN_REQUEST = IN_HEADER.size
MIN_REPLY = OUT_HEADER.size


class FrameError(ValueError):
    """The stream is not a sequence of well-formed FUSE messages: the connection must be dropped."""


def split_frames(buf: bytes | bytearray | memoryview, minimum: int) -> tuple[list[bytes], int]:
    """Split complete messages off the front of `buf`; returns (messages, bytes consumed).

    `minimum` is the smallest legal message (40 for requests, 16 for replies). A length below it or above
    MAX_FRAME raises FrameError: a stream cannot be resynchronised after that."""
    view = memoryview(buf)
    total = len(view)
    pos = 0
    out: list[bytes] = []
    while total - pos >= 4:
        (length,) = struct.unpack_from("<I", view, pos)
        if length < minimum or length > MAX_FRAME:
            raise FrameError(f"bad message length {length} at offset {pos}")
        if total - pos < length:
            break
        out.append(bytes(view[pos:pos + length]))
        pos += length
    return out, pos


def make_room(view: memoryview, start: int, end: int) -> tuple[int, int]:
    """Before a recv into a preallocated buffer whose unparsed messages lie at `start:end`: if the buffer is full,
    move the partial message at its end to the front. Returns the new (start, end)."""
    if end < len(view):
        return start, end
    view[:end - start] = view[start:end]
    return 0, end - start


class InHeader(NamedTuple):
    """A parsed fuse_in_header (a tuple: cheap to build, one per request)."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    extlen: int


_IN_HEADER_FIELDS = struct.Struct("<IIQQIIIH2x")  # IN_HEADER without the padding field
_make_in_header = InHeader._make


def parse_in_header(msg: bytes | memoryview) -> InHeader:
    if len(msg) < 40:
        raise FrameError("request shorter than fuse_in_header")
    h = _make_in_header(_IN_HEADER_FIELDS.unpack_from(msg, 0))
    if h.length != len(msg):
        raise FrameError(f"request length field {h.length} != message size {len(msg)}")
    return h


def pack_reply(unique: int, error: int = 0, payload: bytes = b"") -> bytes:
    """A reply: `error` is 0 or a negative errno."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload


def pack_notify(code: int, payload: bytes) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), code, 0) + payload


def encode_dev(rdev: int) -> int:
    """Userspace dev_t -> the kernel's new_encode_dev() u32 used in fuse_attr.rdev."""
    major = (rdev >> 8) & 0xFFF | ((rdev >> 32) & ~0xFFF)
    minor = (rdev & 0xFF) | ((rdev >> 12) & ~0xFF)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(dev: int) -> tuple[int, int]:
    """fuse_mknod_in.rdev (new_encode_dev u32) -> (major, minor)."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return major, minor
