"""A hostile guest against the fuse-pipe server: a raw client speaks the framed FUSE protocol straight to
`Server`, with whatever uid, node ids and sizes it likes, as a compromised guest kernel could.

The host directory must come out unchanged (no device node, setuid bit, file capability, foreign write) and
the server process must not grow without bound (memory, fds, threads, inotify instances).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fcvm.fusepipe import Server
from fcvm_wire.fusepipe import proto
from tests.support import eventually, require_root

INIT_BODY = struct.pack("<IIIII", 7, 38, 131072, proto.INIT_EXT | proto.DO_READDIRPLUS | proto.POSIX_LOCKS,
                        0) + bytes(44)
USER = 1000
DEADLINE = 30.0  # seconds: generous, for something that should take milliseconds
MiB = 1 << 20


class RawClient:
    """One stream to the server, speaking raw FUSE: every header field is the caller's to choose."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(DEADLINE)
        self.buf = b""
        self.replies: dict[int, tuple[int, bytes]] = {}
        self.notes: list[tuple[int, bytes]] = []  # notifications and hints: (code, payload)
        self.uniques = itertools.count(2)

    def close(self) -> None:
        self.sock.close()

    def hello(self, session_id: int, flags: int = 0) -> int:
        """Send HELLO; the server's status (HELLO_STATUS_OK, HELLO_BUSY), or -1 if it closed the stream."""
        self.sock.sendall(proto.HELLO.pack(proto.MAGIC, session_id, flags, 0))
        try:
            got = self._recv_exact(proto.HELLO_OK.size)
        except (ConnectionError, OSError):
            return -1
        magic, status, _ = proto.HELLO_OK.unpack(got)
        assert magic == proto.MAGIC
        return status

    def start(self, session_id: int, flags: int = 0) -> None:
        assert self.hello(session_id, flags) == proto.HELLO_STATUS_OK
        assert self.call(proto.INIT, INIT_BODY)[0] == 0

    def send(self, opcode: int, body: bytes = b"", *, nodeid: int = proto.ROOT_ID, uid: int = 0, gid: int = 0,
             unique: int | None = None) -> int:
        unique = next(self.uniques) if unique is None else unique
        self.sock.sendall(proto.IN_HEADER.pack(40 + len(body), opcode, unique, nodeid, uid, gid, 4242, 0, 0) + body)
        return unique

    def reply(self, unique: int) -> tuple[int, bytes]:
        """(errno, payload) of request `unique`; notifications are noted, other replies kept for later."""
        while unique not in self.replies:
            while len(self.buf) < 16 or len(self.buf) < struct.unpack_from("<I", self.buf)[0]:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("the server closed the stream")
                self.buf += chunk
            length, error, got = proto.OUT_HEADER.unpack_from(self.buf)
            if got:
                self.replies[got] = (-error, self.buf[16:length])
            else:
                self.notes.append((error, self.buf[16:length]))
            self.buf = self.buf[length:]
        return self.replies.pop(unique)

    def call(self, opcode: int, body: bytes = b"", **header: int) -> tuple[int, bytes]:
        return self.reply(self.send(opcode, body, **header))

    def lookup(self, name: str, parent: int = proto.ROOT_ID, **header: int) -> int:
        err, entry = self.call(proto.LOOKUP, name.encode() + b"\0", nodeid=parent, **header)
        assert err == 0, (name, os.strerror(err))
        return int(struct.unpack_from("<Q", entry)[0])

    def open(self, nodeid: int, flags: int, opcode: int = proto.OPEN, **header: int) -> int:
        err, out = self.call(opcode, struct.pack("<II", flags, 0), nodeid=nodeid, **header)
        assert err == 0, os.strerror(err)
        return int(struct.unpack_from("<Q", out)[0])

    def _recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(n - len(self.buf))
            if not chunk:
                raise ConnectionError("the server closed the stream")
            self.buf += chunk
        got, self.buf = self.buf[:n], self.buf[n:]
        return got


def setattr_body(*, valid: int, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0, mtime: int = 0) -> bytes:
    return struct.pack("<IIQQQQQQIIIIIII", valid, 0, 0, size, 0, 0, mtime, 0, 0, 0, 0, mode, 0, uid, gid) + bytes(8)


def create_body(name: str, mode: int, flags: int = os.O_WRONLY | os.O_CREAT) -> bytes:
    return struct.pack("<IIII", flags, mode, 0, 0) + name.encode() + b"\0"


def mknod_body(name: str, mode: int, rdev: int = 0) -> bytes:
    return struct.pack("<IIII", mode, rdev, 0, 0) + name.encode() + b"\0"


def mkdir_body(name: str, mode: int) -> bytes:
    return struct.pack("<II", mode, 0) + name.encode() + b"\0"


def setxattr_body(name: str, value: bytes) -> bytes:
    return struct.pack("<II", len(value), 0) + name.encode() + b"\0" + value


def lock_body(fh: int, owner: int, typ: int) -> bytes:
    return proto.LK_IN.pack(fh, owner, 0, proto.OFFSET_MAX, typ, 4242, 0, 0)


def tree(base: Path) -> dict[str, tuple[object, ...]]:
    """What the host sees of `base`: each entry's type, mode, owner, size, rdev, link target, xattrs and, for a
    file, content."""
    out: dict[str, tuple[object, ...]] = {}
    for path in sorted([base, *base.rglob("*")]):
        st = os.lstat(path)
        xattrs: dict[str, bytes] = {}
        if not stat.S_ISLNK(st.st_mode):
            xattrs = {name: os.getxattr(path, name) for name in sorted(os.listxattr(path))}
        extra = os.readlink(path) if stat.S_ISLNK(st.st_mode) else (
            path.read_bytes() if stat.S_ISREG(st.st_mode) else None)
        out[str(path.relative_to(base))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size if stat.S_ISREG(st.st_mode)
                                            else None, st.st_rdev, xattrs, extra)
    return out


@dataclass
class Resources:
    rss: int
    fds: int
    threads: int
    inotify: int

    @classmethod
    def now(cls) -> Resources:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        fds = os.listdir("/proc/self/fd")
        inotify = 0
        for fd in fds:
            with contextlib.suppress(OSError):
                inotify += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        return cls(rss, len(fds), threading.active_count(), inotify)


@dataclass
class Served:
    src: Path
    server: Server
    address: str

    def connect(self) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.address)
        return RawClient(sock)

    def client(self, session_id: int = 1, flags: int = 0) -> RawClient:
        c = self.connect()
        c.start(session_id, flags)
        return c


@pytest.fixture
def baseline() -> Resources:
    """The process before the server exists."""
    require_root()
    return Resources.now()


@pytest.fixture
def served(tmp_path: Path, baseline: Resources) -> Iterator[Served]:
    src = tmp_path / "src"
    src.mkdir()
    os.chmod(src, 0o755)
    server = Server(str(src), hello_timeout=1.0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = f"\0fp-hostile-{os.getpid()}-{id(server)}"
    listener.bind(address)
    listener.listen(64)
    thread = threading.Thread(target=server.serve_forever, args=(listener,), daemon=True)
    thread.start()
    try:
        yield Served(src, server, address)
    finally:
        server.close()
        thread.join(DEADLINE)
        listener.close()


# ---- nothing privileged is ever made on the host ---------------------------------------------------------
@pytest.mark.parametrize("uid", [0, USER], ids=["root", "user"])
def test_no_device_setid_bit_or_security_xattr_reaches_the_host(served: Served, uid: int) -> None:
    src = served.src
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "tool", 0o755)
    os.chown(src / "tool", uid, uid)
    os.chown(src, uid, uid)  # the requester may create here: what it creates must still be harmless
    before = tree(src)
    c = served.client()
    as_requester = {"uid": uid, "gid": uid}
    tool = c.lookup("tool", **as_requester)

    refused = {
        "mknod char device": c.call(proto.MKNOD, mknod_body("null", stat.S_IFCHR | 0o666, proto.encode_dev(
            os.makedev(1, 3))), **as_requester),
        "mknod block device": c.call(proto.MKNOD, mknod_body("disk", stat.S_IFBLK | 0o660, proto.encode_dev(
            os.makedev(8, 0))), **as_requester),
        "setxattr security.capability": c.call(
            proto.SETXATTR, setxattr_body("security.capability", struct.pack("<IIIII", 0x02000000, 1 << 21, 0, 0, 0)),
            nodeid=tool, **as_requester),
        "setxattr trusted": c.call(proto.SETXATTR, setxattr_body("trusted.x", b"1"), nodeid=tool, **as_requester),
        "removexattr security": c.call(proto.REMOVEXATTR, b"security.capability\0", nodeid=tool, **as_requester),
    }
    assert {what: errno.errorcode.get(err) for what, (err, _) in refused.items()} == dict.fromkeys(refused, "EPERM")
    # Asking for setuid/setgid succeeds, without the bits.
    assert c.call(proto.SETATTR, setattr_body(valid=proto.FATTR_MODE, mode=0o6755), nodeid=tool, **as_requester)[0] == 0
    assert tree(src) == before

    made = {
        "create": c.call(proto.CREATE, create_body("suid", stat.S_IFREG | 0o4755), **as_requester),
        "mknod file": c.call(proto.MKNOD, mknod_body("suid2", stat.S_IFREG | 0o6755), **as_requester),
        "mkdir": c.call(proto.MKDIR, mkdir_body("sgid", stat.S_IFDIR | 0o2775), **as_requester),
        "mknod fifo": c.call(proto.MKNOD, mknod_body("fifo", stat.S_IFIFO | 0o2644), **as_requester),
    }
    assert {what: err for what, (err, _) in made.items()} == dict.fromkeys(made, 0)
    after = tree(src)
    new = {name: (stat.filemode(entry[0]), entry[1]) for name, entry in after.items() if name not in before}
    assert new == {"suid": ("-rwxr-xr-x", uid), "suid2": ("-rwxr-xr-x", uid), "sgid": ("drwxrwxr-x", uid),
                   "fifo": ("prw-r--r--", uid)}
    assert {name: entry for name, entry in after.items() if name in before} == before


def test_requests_act_as_their_uid_without_privilege(served: Served) -> None:
    src = served.src
    (src / "rootfile").write_bytes(b"root's")
    os.chmod(src / "rootfile", 0o644)
    (src / "secret").write_bytes(b"top secret")
    os.chmod(src / "secret", 0o600)
    (src / "userfile").write_bytes(b"user data")
    os.chmod(src / "userfile", 0o600)
    os.chown(src / "userfile", USER, USER)
    (src / "rootdir").mkdir(mode=0o755)
    (src / "rootdir" / "inner").write_bytes(b"inner")
    before = tree(src)
    c = served.client()
    user = {"uid": USER, "gid": USER}
    rootfile, secret, userfile = (c.lookup(n) for n in ("rootfile", "secret", "userfile"))
    rootdir = c.lookup("rootdir")
    open_for_read, open_for_write = struct.pack("<II", os.O_RDONLY, 0), struct.pack("<II", os.O_WRONLY, 0)
    chmod_666 = setattr_body(valid=proto.FATTR_MODE, mode=0o666)
    attempts: list[tuple[str, str, tuple[int, bytes]]] = [
        # A user may not write, truncate, chmod, chown or touch root's file, nor read root's 0600 one.
        ("user opens root's 0644 file for writing", "EACCES",
         c.call(proto.OPEN, open_for_write, nodeid=rootfile, **user)),
        ("user truncates it", "EACCES",
         c.call(proto.SETATTR, setattr_body(valid=proto.FATTR_SIZE), nodeid=rootfile, **user)),
        ("user re-creates it with O_TRUNC", "EACCES",
         c.call(proto.CREATE, create_body("rootfile", 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), **user)),
        ("user chmods it", "EPERM", c.call(proto.SETATTR, chmod_666, nodeid=rootfile, **user)),
        ("user chowns it to themselves", "EPERM",
         c.call(proto.SETATTR, setattr_body(valid=proto.FATTR_UID, uid=USER), nodeid=rootfile, **user)),
        ("user sets its mtime", "EPERM",
         c.call(proto.SETATTR, setattr_body(valid=proto.FATTR_MTIME, mtime=5), nodeid=rootfile, **user)),
        ("user sets a user xattr on it", "EACCES",
         c.call(proto.SETXATTR, setxattr_body("user.x", b"1"), nodeid=rootfile, **user)),
        ("user reads root's 0600 file", "EACCES", c.call(proto.OPEN, open_for_read, nodeid=secret, **user)),
        ("user gives their file to root", "EPERM",
         c.call(proto.SETATTR, setattr_body(valid=proto.FATTR_UID, uid=0), nodeid=userfile, **user)),
        ("user unlinks in root's directory", "EACCES", c.call(proto.UNLINK, b"inner\0", nodeid=rootdir, **user)),
        ("user creates in root's directory", "EACCES",
         c.call(proto.CREATE, create_body("new", 0o644), nodeid=rootdir, **user)),
        ("user renames root's file", "EACCES",
         c.call(proto.RENAME, struct.pack("<Q", proto.ROOT_ID) + b"rootfile\0stolen\0", **user)),
        # uid 0 is host root without capabilities: no DAC override, no chown, no chmod of others' files.
        ("root reads the user's 0600 file", "EACCES", c.call(proto.OPEN, open_for_read, nodeid=userfile)),
        ("root chmods the user's file", "EPERM", c.call(proto.SETATTR, chmod_666, nodeid=userfile)),
        ("root takes the user's file", "EPERM",
         c.call(proto.SETATTR, setattr_body(valid=proto.FATTR_UID, uid=0), nodeid=userfile)),
        ("root gives its own file away", "EPERM",
         c.call(proto.SETATTR, setattr_body(valid=proto.FATTR_UID | proto.FATTR_GID, uid=USER, gid=USER),
                nodeid=rootfile)),
        ("a uid the host cannot act as reads", "EPERM",
         c.call(proto.OPEN, open_for_read, nodeid=secret, uid=0xFFFFFFFF, gid=0xFFFFFFFF)),
    ]
    assert [(what, errno.errorcode.get(err)) for what, _, (err, _) in attempts] == \
        [(what, expected) for what, expected, _ in attempts]
    assert tree(src) == before
    assert not [what for what, _, (_, payload) in attempts if b"secret" in payload or b"user data" in payload]


# ---- bounded resources ------------------------------------------------------------------------------
def _dirents(payload: bytes, plus: bool) -> list[tuple[bytes, int]]:
    """(name, offset) of each entry of a READDIR / READDIRPLUS reply."""
    out = []
    pos = 0
    while pos < len(payload):
        if plus:
            pos += proto.ENTRY_OUT.size
        _ino, off, namelen, _type = proto.DIRENT.unpack_from(payload, pos)
        start = pos + proto.DIRENT.size
        out.append((payload[start:start + namelen], off))
        pos = start + namelen + (-(proto.DIRENT.size + namelen) % 8)
    return out


def _list(c: RawClient, fh: int, nodeid: int, opcode: int, size: int) -> list[bytes]:
    names: list[bytes] = []
    offset = 0
    while True:
        err, payload = c.call(opcode, struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0), nodeid=nodeid)
        assert err == 0 and len(payload) <= size
        entries = _dirents(payload, opcode == proto.READDIRPLUS)
        if not entries:
            return names
        names += [name for name, _ in entries]
        offset = entries[-1][1]


@pytest.fixture
def big_dir(served: Served) -> Path:
    """A directory whose whole listing is larger than one frame."""
    big = served.src / "big"
    big.mkdir()
    for i in range(6000):
        (big / f"{i:06d}{'x' * 194}").touch()
    return big


def test_readdir_replies_fit_the_request_and_one_frame(served: Served, big_dir: Path) -> None:
    c = served.client()
    nodeid = c.lookup("big")
    everything = sorted([b".", b"..", *(os.fsencode(n) for n in os.listdir(big_dir))])
    for opcode in (proto.READDIR, proto.READDIRPLUS):
        fh = c.open(nodeid, os.O_RDONLY, proto.OPENDIR)
        err, payload = c.call(opcode, struct.pack("<QQIIQII", fh, 0, 0xFFFFFFFF, 0, 0, 0, 0), nodeid=nodeid)
        assert err == 0 and 0 < len(payload) <= proto.MAX_FRAME - proto.OUT_HEADER.size
        assert sorted(_list(c, fh, nodeid, opcode, 4096)) == everything  # page by page: each entry once
        assert c.call(proto.RELEASEDIR, struct.pack("<QIIQ", fh, 0, 0, 0), nodeid=nodeid)[0] == 0


def test_directory_listings_and_replies_are_not_kept(served: Served, big_dir: Path) -> None:
    c = served.client()
    nodeid = c.lookup("big")
    fh = c.open(nodeid, os.O_RDONLY, proto.OPENDIR)
    c.call(proto.READDIRPLUS, struct.pack("<QQIIQII", fh, 0, 0xFFFFFFFF, 0, 0, 0, 0), nodeid=nodeid)  # warm up
    before = Resources.now()
    for _ in range(40):  # each opens the directory afresh and asks for all of it, twice
        dir_fh = c.open(nodeid, os.O_RDONLY, proto.OPENDIR)
        for opcode in (proto.READDIR, proto.READDIRPLUS):
            assert c.call(opcode, struct.pack("<QQIIQII", dir_fh, 0, 0xFFFFFFFF, 0, 0, 0, 0), nodeid=nodeid)[0] == 0
        assert c.call(proto.RELEASEDIR, struct.pack("<QIIQ", dir_fh, 0, 0, 0), nodeid=nodeid)[0] == 0
    after = Resources.now()
    assert after.rss - before.rss < 24 * MiB, f"the server kept {(after.rss - before.rss) / MiB:.0f} MiB"
    assert after.fds <= before.fds


def test_directories_are_listed_for_the_relay_rarely_and_only_when_small(served: Served, big_dir: Path) -> None:
    """A negative LOOKUP makes the server list the directory for a relay that asked for hints: at most once per
    negative timeout (1 s), however many lookups the guest sends, and never a directory too large to send."""
    small = served.src / "small"
    small.mkdir()
    for i in range(10):
        (small / f"f{i}").touch()
    plain = served.client(session_id=1)
    hinted = served.client(session_id=2, flags=proto.HELLO_FLAG_HINTS)
    for c in (plain, hinted):
        c.lookup("small")
        c.lookup("big")

    def listings(c: RawClient, name: str) -> list[set[bytes]]:
        nodeid = c.lookup(name)
        return [set(body[proto.HINT_HEAD.size:].split(b"\0")) - {b""} for code, body in c.notes
                if code == proto.HINT_DIR_NAMES and proto.HINT_HEAD.unpack_from(body)[0] == nodeid]

    started = time.monotonic()
    for i in range(300):
        for c in (plain, hinted):
            for parent in ("small", "big"):
                err, entry = c.call(proto.LOOKUP, f"missing{i}\0".encode(), nodeid=c.lookup(parent))
                assert err == 0 and struct.unpack_from("<Q", entry)[0] == 0  # a negative entry
    elapsed = time.monotonic() - started
    assert listings(plain, "small") == [] and listings(plain, "big") == []  # it did not ask for hints
    assert listings(hinted, "big") == []
    got = listings(hinted, "small")
    assert got and all(names == {f"f{i}".encode() for i in range(10)} for names in got)
    assert len(got) <= elapsed / 1.0 + 1, (len(got), elapsed)


def test_sessions_are_bounded_and_share_one_inotify_instance(served: Served, baseline: Resources) -> None:
    server = served.server
    live: list[RawClient] = []
    statuses = []
    for sid in range(1, 41):
        c = served.connect()
        status = c.hello(sid)
        statuses.append(status)
        if status == proto.HELLO_STATUS_OK:
            assert c.call(proto.INIT, INIT_BODY)[0] == 0
            live.append(c)
        else:
            c.close()
    now = Resources.now()
    assert now.inotify - baseline.inotify == 1
    assert len(live) == server.max_sessions and len(server.sessions) == server.max_sessions
    assert set(statuses[server.max_sessions:]) <= {proto.HELLO_BUSY, -1}
    assert now.threads - baseline.threads <= server.max_connections + 2
    # Every admitted session works; once they have gone, new sessions take the places of the old ones.
    for c in live:
        assert c.call(proto.GETATTR, bytes(16))[0] == 0
        c.close()
    eventually(lambda: all(s.conn is None for s in list(server.sessions.values())), "the streams were detached")
    for sid in range(100, 100 + server.max_sessions):
        c = served.client(sid)
        assert c.call(proto.GETATTR, bytes(16))[0] == 0
        c.close()
    assert len(server.sessions) <= server.max_sessions
    assert Resources.now().inotify - baseline.inotify == 1


def test_a_stream_that_never_says_hello_is_dropped(served: Served, baseline: Resources) -> None:
    silent = served.connect()
    partial = served.connect()
    partial.sock.sendall(proto.MAGIC)  # a third of a HELLO, then nothing
    for c in (silent, partial):
        assert c.sock.recv(16) == b"", "the server never closed the stream"  # recv waits up to DEADLINE
        c.close()
    eventually(lambda: served.server.connections == 0, "the stream threads ended")
    assert threading.active_count() <= baseline.threads + 2


def test_lock_waits_lock_fds_and_interrupts_are_bounded(served: Served, baseline: Resources) -> None:
    (served.src / "lockme").write_bytes(b"x")
    c = served.client()
    nodeid = c.lookup("lockme")
    fh = c.open(nodeid, os.O_RDWR)
    assert c.call(proto.SETLK, lock_body(fh, 1, fcntl.F_WRLCK), nodeid=nodeid)[0] == 0
    # Lock waits: each would block for as long as owner 1 holds the lock.
    waits = [c.send(proto.SETLKW, lock_body(fh, owner, fcntl.F_WRLCK), nodeid=nodeid) for owner in range(2, 202)]
    limit = served.server.max_lock_waits
    refused = [u for u in waits[limit:] if c.reply(u)[0] == errno.ENOLCK]
    assert len(refused) == len(waits) - limit
    assert threading.active_count() - baseline.threads <= limit + served.server.max_connections + 2
    # Interrupts for requests that are not waiting are not remembered.
    c.sock.sendall(b"".join(proto.IN_HEADER.pack(48, proto.INTERRUPT, 10**6 + i, 0, 0, 0, 0, 0, 0)
                            + struct.pack("<Q", 10**9 + i) for i in range(50000)))
    assert c.call(proto.GETATTR, bytes(16))[0] == 0  # all of them have been read
    session = next(iter(served.server.sessions.values()))
    assert len(session.fs.interrupted) == 0
    # An interrupt for a waiting request ends its wait.
    for u in waits[:limit]:
        c.send(proto.INTERRUPT, struct.pack("<Q", u), nodeid=0)
    assert {c.reply(u)[0] for u in waits[:limit]} == {errno.EINTR}
    eventually(lambda: threading.active_count() <= baseline.threads + served.server.max_connections + 2,
               "the lock-wait threads ended")
    # Lock fds: one per (file, owner) that tried to lock; a flood of owners meets ENOLCK, not fd exhaustion.
    before = Resources.now()
    answers = []
    for first in range(1000, 2500, 100):  # a hundred at a time: each reply is a send, and we read them
        tries = [c.send(proto.SETLK, lock_body(fh, owner, fcntl.F_RDLCK), nodeid=nodeid)
                 for owner in range(first, first + 100)]
        answers += [c.reply(u)[0] for u in tries]
    assert set(answers) == {errno.EAGAIN, errno.ENOLCK}
    assert Resources.now().fds - before.fds <= 1024


def test_file_content_goes_with_an_open_only_to_a_relay_that_can_store_it_safely(served: Served) -> None:
    """A read-only OPEN brings the file's content along (HINT_STORE) only for a relay that asked for hints, only
    for a file of at most 64 KiB, only when no other handle is open on the file (a READ of it could be holding its
    pages, and the relay's store would wait for it), and never on a session the server adopted: the guest there
    may hold files this server never opened. What comes along is what a READ gives."""
    (served.src / "small").write_bytes(b"s" * 5000)
    (served.src / "large").write_bytes(b"l" * ((64 << 10) + 1))

    def stores(c: RawClient, name: str, flags: int = os.O_RDONLY) -> list[bytes]:
        nodeid = c.lookup(name)
        c.notes.clear()
        c.open(nodeid, flags)
        return [body[proto.HINT_HEAD.size:] for code, body in c.notes
                if code == proto.HINT_STORE and proto.HINT_HEAD.unpack_from(body)[0] == nodeid]

    plain = served.client(session_id=1)
    assert stores(plain, "small") == []
    hinted = served.client(session_id=2, flags=proto.HELLO_FLAG_HINTS)
    assert stores(hinted, "small") == [b"s" * 5000]
    assert stores(hinted, "small") == []  # the first handle is still open
    assert stores(hinted, "large") == []
    assert stores(hinted, "small", os.O_RDWR) == []
    adopted = served.connect()
    assert adopted.hello(3, proto.HELLO_FLAG_HINTS | proto.HELLO_FLAG_INITIALIZED) == proto.HELLO_STATUS_OK
    assert stores(adopted, "small") == []
    (served.src / "secret").write_bytes(b"x")
    os.chmod(served.src / "secret", 0o600)
    secret = hinted.lookup("secret")
    hinted.notes.clear()
    err, _ = hinted.call(proto.OPEN, struct.pack("<II", os.O_RDONLY, 0), nodeid=secret, uid=USER, gid=USER)
    assert err == errno.EACCES and all(code != proto.HINT_STORE for code, _ in hinted.notes)


def _fd_table_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("FDSize:"))


def test_holding_many_files_never_grows_the_fd_table_while_serving(served: Served) -> None:
    """The server holds an fd per inode the guest knows. Growing a threaded process's fd table waits for an RCU
    grace period each time it doubles (milliseconds each, on the request path); the server sized it up front."""
    many = served.src / "many"
    many.mkdir()
    files = 900  # within the smallest usual fd limit (1024), above the table a process starts with (64)
    for i in range(files):
        (many / str(i)).touch()
    c = served.client()
    size = _fd_table_size()
    parent = c.lookup("many")
    for i in range(files):
        c.lookup(str(i), parent)
    assert _fd_table_size() == size > files
