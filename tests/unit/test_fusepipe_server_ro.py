"""A read-only volume is read-only in the server, not only in the guest's mount: every request that would
change the served tree is refused with EROFS by the server itself, whatever the guest kernel lets through."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fcvm.fusepipe import Server
from fcvm.fusepipe.fs import Filesystem
from fcvm_wire.fusepipe import proto
from tests.unit.test_fusepipe_wire import dispatch

INIT_BODY = struct.pack("<IIIII", 7, 38, 131072, 0, 0) + bytes(44)


class Client:
    """Requests straight to a Filesystem's dispatch (on a thread of the tests' own, as the server's reader
    thread makes them)."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.uniques = itertools.count(1)
        assert self.call(proto.INIT, INIT_BODY)[0] == 0

    def call(self, opcode: int, body: bytes = b"", nodeid: int = proto.ROOT_ID) -> tuple[int, bytes]:
        msg = proto.IN_HEADER.pack(40 + len(body), opcode, next(self.uniques), nodeid, os.geteuid(), os.getegid(),
                                   1, 0, 0) + body
        reply = dispatch(self.fs, msg)
        assert reply is not None
        _, error, _ = proto.OUT_HEADER.unpack_from(reply)
        return -error, reply[proto.OUT_HEADER.size:]

    def lookup(self, name: str, parent: int = proto.ROOT_ID) -> int:
        err, entry = self.call(proto.LOOKUP, name.encode() + b"\0", parent)
        assert err == 0, name
        return int(struct.unpack_from("<Q", entry)[0])

    def open(self, name: str, flags: int) -> int:
        err, out = self.call(proto.OPEN, struct.pack("<II", flags, 0), self.lookup(name))
        assert err == 0, name
        return int(struct.unpack_from("<Q", out)[0])


@dataclass
class Mutation:
    opcode: int
    request: Callable[[Client, int], tuple[bytes, int]]  # (client, open flags for handles) -> (body, node id)
    changes_tree: bool = True  # on a writable volume (an open for writing alone changes nothing yet)


def _setattr(valid: int, *, mode: int = 0, size: int = 0, mtime: int = 0) -> bytes:
    return struct.pack("<IIQQQQQQIIIIIII", valid, 0, 0, size, 0, 0, mtime, 0, 0, 0, 0, mode, 0, 0, 0) + bytes(8)


def _open(flags: int, changes_tree: bool) -> Mutation:
    return Mutation(proto.OPEN, lambda c, _: (struct.pack("<II", flags, 0), c.lookup("f")), changes_tree)


# Every FUSE request that changes the served tree, with a request that does change it on a writable volume.
MUTATIONS: dict[str, Mutation] = {
    "setattr mode": Mutation(proto.SETATTR, lambda c, _: (_setattr(proto.FATTR_MODE, mode=0o600), c.lookup("f"))),
    "setattr size": Mutation(proto.SETATTR, lambda c, _: (_setattr(proto.FATTR_SIZE, size=1), c.lookup("f"))),
    "setattr mtime": Mutation(proto.SETATTR, lambda c, _: (_setattr(proto.FATTR_MTIME, mtime=5), c.lookup("f"))),
    "mknod": Mutation(proto.MKNOD, lambda c, _: (struct.pack("<IIII", stat.S_IFIFO | 0o644, 0, 0, 0) + b"p\0",
                                                 proto.ROOT_ID)),
    "mkdir": Mutation(proto.MKDIR, lambda c, _: (struct.pack("<II", 0o755, 0) + b"newdir\0", proto.ROOT_ID)),
    "unlink": Mutation(proto.UNLINK, lambda c, _: (b"f\0", proto.ROOT_ID)),
    "rmdir": Mutation(proto.RMDIR, lambda c, _: (b"empty\0", proto.ROOT_ID)),
    "symlink": Mutation(proto.SYMLINK, lambda c, _: (b"sl\0f\0", proto.ROOT_ID)),
    "rename": Mutation(proto.RENAME, lambda c, _: (struct.pack("<Q", proto.ROOT_ID) + b"f\0g\0", proto.ROOT_ID)),
    "rename2": Mutation(proto.RENAME2, lambda c, _: (struct.pack("<QII", proto.ROOT_ID, 0, 0) + b"f\0g\0",
                                                     proto.ROOT_ID)),
    "link": Mutation(proto.LINK, lambda c, _: (struct.pack("<Q", c.lookup("f")) + b"hard\0", proto.ROOT_ID)),
    "open O_WRONLY": _open(os.O_WRONLY, changes_tree=False),
    "open O_RDWR": _open(os.O_RDWR, changes_tree=False),
    "open O_WRONLY|O_APPEND": _open(os.O_WRONLY | os.O_APPEND, changes_tree=False),
    "open O_RDONLY|O_TRUNC": _open(os.O_RDONLY | os.O_TRUNC, changes_tree=True),
    "open O_RDWR|O_TRUNC": _open(os.O_RDWR | os.O_TRUNC, changes_tree=True),
    "create": Mutation(proto.CREATE, lambda c, _: (struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o644, 0, 0)
                                                   + b"new\0", proto.ROOT_ID)),
    "tmpfile": Mutation(proto.TMPFILE, lambda c, _: (struct.pack("<IIII", os.O_RDWR, 0o600, 0, 0),
                                                     c.lookup("empty")), changes_tree=False),
    "write": Mutation(proto.WRITE, lambda c, flags: (struct.pack("<QQIIQII", c.open("f", flags), 0, 3, 0, 0, 0, 0)
                                                     + b"new", c.lookup("f"))),
    "setxattr": Mutation(proto.SETXATTR, lambda c, _: (struct.pack("<II", 1, 0) + b"user.k\0v", c.lookup("f"))),
    "removexattr": Mutation(proto.REMOVEXATTR, lambda c, _: (b"user.pre\0", c.lookup("f"))),
    "fallocate": Mutation(proto.FALLOCATE, lambda c, flags: (struct.pack("<QQQII", c.open("f", flags), 0, 8192, 0,
                                                                         0), c.lookup("f"))),
    "copy_file_range": Mutation(proto.COPY_FILE_RANGE, lambda c, flags: (
        struct.pack("<QQQQQQQ", c.open("f", os.O_RDONLY), 0, c.lookup("f2"), c.open("f2", flags), 0, 4, 0),
        c.lookup("f"))),
}

# Everything else the protocol has reads, syncs, locks or manages the session: the tree stays as it is.
READING = {proto.LOOKUP, proto.FORGET, proto.GETATTR, proto.READLINK, proto.READ, proto.STATFS, proto.RELEASE,
           proto.FSYNC, proto.GETXATTR, proto.LISTXATTR, proto.FLUSH, proto.INIT, proto.OPENDIR, proto.READDIR,
           proto.RELEASEDIR, proto.FSYNCDIR, proto.GETLK, proto.SETLK, proto.SETLKW, proto.ACCESS, proto.INTERRUPT,
           proto.BMAP, proto.DESTROY, proto.IOCTL, proto.POLL, proto.NOTIFY_REPLY, proto.BATCH_FORGET,
           proto.READDIRPLUS, proto.LSEEK, proto.SETUPMAPPING, proto.REMOVEMAPPING, proto.SYNCFS, proto.STATX}


def test_every_opcode_is_either_a_mutation_or_reading() -> None:
    """A new opcode in the protocol must be put on one side here (and refused by a read-only server if it
    writes)."""
    mutating = {m.opcode for m in MUTATIONS.values()}
    assert mutating.isdisjoint(READING)
    assert mutating | READING == set(proto.OPCODE_NAMES)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    return {str(p.relative_to(root)): (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns,
                                       p.read_bytes() if p.is_file() and not p.is_symlink() else None,
                                       sorted(os.listxattr(p)) if not p.is_symlink() else None)
            for p in sorted([root, *root.rglob("*")]) for st in [os.lstat(p)]}


@pytest.fixture
def served(tmp_path: Path) -> Path:
    (tmp_path / "f").write_bytes(b"data")
    os.setxattr(tmp_path / "f", "user.pre", b"1")
    (tmp_path / "f2").write_bytes(b"....")
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.fixture(params=[False, True], ids=["writable", "read-only"])
def client(request: pytest.FixtureRequest, served: Path) -> Iterator[Client]:
    fs = Filesystem(str(served), read_only=request.param)
    yield Client(fs)
    fs.close()


@pytest.mark.parametrize("what", list(MUTATIONS))
def test_a_read_only_server_refuses_every_mutation(client: Client, served: Path, what: str) -> None:
    mutation = MUTATIONS[what]
    read_only = client.fs.read_only
    body, nodeid = mutation.request(client, os.O_RDONLY if read_only else os.O_RDWR)
    before = tree(served)
    err, _ = client.call(mutation.opcode, body, nodeid)
    if read_only:
        assert (errno.errorcode.get(err), tree(served)) == ("EROFS", before)
    else:  # the same request on a writable volume: proof that it is a mutation the read-only one refused
        assert err == 0, os.strerror(err)
        assert (tree(served) != before) == mutation.changes_tree


def test_a_read_only_server_serves_reads_and_refuses_writes_over_its_stream(served: Path) -> None:
    server = Server(str(served), read_only=True, watch=False)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve_connection, args=(theirs,), daemon=True)
    thread.start()
    ours.settimeout(30)
    try:
        ours.sendall(proto.HELLO.pack(proto.MAGIC, 1, proto.HELLO_FLAG_READ_ONLY, 0))
        assert proto.HELLO_OK.unpack(ours.recv(proto.HELLO_OK.size))[1] == proto.HELLO_STATUS_OK
        requests = [(proto.INIT, INIT_BODY), (proto.LOOKUP, b"f\0"),
                    (proto.MKDIR, struct.pack("<II", 0o755, 0) + b"d\0"),
                    (proto.CREATE, struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o644, 0, 0) + b"n\0")]
        ours.sendall(b"".join(proto.IN_HEADER.pack(40 + len(body), opcode, unique, proto.ROOT_ID, 0, 0, 1, 0, 0)
                              + body for unique, (opcode, body) in enumerate(requests, 1)))
        buf = b""
        frames: list[bytes] = []
        while len(frames) < len(requests):
            chunk = ours.recv(1 << 16)
            assert chunk, "the server closed the stream"
            buf += chunk
            got, used = proto.split_frames(buf, proto.MIN_REPLY)
            frames += got
            buf = buf[used:]
        errors = {unique: -error for _, error, unique in (proto.OUT_HEADER.unpack_from(f) for f in frames)}
        assert errors == {1: 0, 2: 0, 3: errno.EROFS, 4: errno.EROFS}
    finally:
        ours.close()
        thread.join(30)
        server.close()
    assert sorted(os.listdir(served)) == ["empty", "f", "f2"]
