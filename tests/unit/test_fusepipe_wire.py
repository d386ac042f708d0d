"""fuse-pipe decoders and the server's request handling, without a kernel mount (fuzzed with hypothesis)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcvm.fusepipe.fs import Filesystem
from fcvm.fusepipe.server import Connection, Server, Session, Workers
from fcvm_wire.fusepipe import proto
from tests.support import eventually

INIT_BODY = struct.pack("<IIIII", 7, 45, 131072, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(44)
# Handling a request makes the calling thread act as the request's uid without capabilities, as the server's
# threads do: the tests hand requests to a thread of their own, and pytest's keeps its privileges.
SERVER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp-test-server")


def dispatch(fs: Filesystem, msg: bytes) -> bytes | None:
    return SERVER_THREAD.submit(fs.dispatch, proto.parse_in_header(msg), msg).result()


def req(opcode: int, body: bytes = b"", *, unique: int = 2, nodeid: int = 1, uid: int = os.geteuid(),
        gid: int = os.getegid()) -> bytes:
    return proto.IN_HEADER.pack(40 + len(body), opcode, unique, nodeid, uid, gid, 1, 0, 0) + body


def reply_error(reply: bytes | None) -> int:
    assert reply is not None
    length, error, _ = proto.OUT_HEADER.unpack_from(reply)
    assert length == len(reply)
    return -error


@pytest.fixture
def fs(tmp_path: Path) -> Filesystem:
    f = Filesystem(str(tmp_path))
    msg = req(proto.INIT, INIT_BODY)
    assert reply_error(dispatch(f, msg)) == 0
    return f


def call(fs: Filesystem, opcode: int, body: bytes = b"", **kw: int) -> bytes | None:
    msg = req(opcode, body, **kw)
    return dispatch(fs, msg)


@given(st.binary(max_size=300))
def test_split_frames_never_misparses(data: bytes) -> None:
    try:
        frames, used = proto.split_frames(data, proto.MIN_REQUEST)
    except proto.FrameError:
        return
    assert used == sum(len(f) for f in frames) <= len(data)
    for f in frames:
        assert struct.unpack_from("<I", f)[0] == len(f) >= proto.MIN_REQUEST


@given(st.lists(st.binary(min_size=0, max_size=100), max_size=5), st.integers(1, 7))
def test_split_frames_reassembles_any_chunking(bodies: list[bytes], chunk: int) -> None:
    stream = b"".join(req(proto.GETATTR, b) for b in bodies)
    buf = bytearray()
    got: list[bytes] = []
    for i in range(0, len(stream), chunk):
        buf += stream[i:i + chunk]
        frames, used = proto.split_frames(buf, proto.MIN_REQUEST)
        del buf[:used]
        got += frames
    assert got == [req(proto.GETATTR, b) for b in bodies] and not buf


def test_frame_length_out_of_range_is_rejected() -> None:
    with pytest.raises(proto.FrameError):
        proto.split_frames(struct.pack("<I", 12) + bytes(40), proto.MIN_REQUEST)
    with pytest.raises(proto.FrameError):
        proto.split_frames(struct.pack("<I", proto.MAX_FRAME + 1), proto.MIN_REQUEST)


@given(st.integers(0, 4095), st.integers(0, (1 << 20) - 1))
def test_device_numbers_round_trip(major: int, minor: int) -> None:
    assert proto.decode_dev(proto.encode_dev(os.makedev(major, minor))) == (major, minor)


def _outside(base: Path, served: Path) -> dict[str, tuple[object, ...]]:
    """Everything under `base` but the served directory: names, modes, sizes, times, contents."""
    return {str(p): (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                     p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(base.rglob("*")) if p != served and served not in p.parents
            for st in [os.lstat(p)]}


@settings(max_examples=400, suppress_health_check=list(HealthCheck), deadline=None)
@given(opcode=st.integers(0, 60) | st.integers(0, 2**32 - 1), body=st.binary(max_size=200),
       nodeid=st.sampled_from([0, 1, 2, 3, 2**64 - 1]))
def test_any_request_gets_a_well_formed_answer(tmp_path_factory: pytest.TempPathFactory, opcode: int, body: bytes,
                                               nodeid: int) -> None:
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "served"
    root.mkdir()
    (root / "f").write_text("x")
    (base / "outside").write_text("not the guest's")
    (base / "outside-dir").mkdir()
    os.symlink("../outside", root / "up")
    before = _outside(base, root)
    f = Filesystem(str(root))
    try:
        init = req(proto.INIT, INIT_BODY)
        dispatch(f, init)
        msg = req(opcode, body, nodeid=nodeid)
        reply = dispatch(f, msg)
        if reply is None:
            assert opcode in proto.NO_REPLY
        else:
            assert reply_error(reply) >= 0
            assert proto.OUT_HEADER.unpack_from(reply)[2] == 2
    finally:
        f.close()
    assert _outside(base, root) == before  # nothing outside touched


def test_fsync_flush_and_locks_never_answer_enosys(fs: Filesystem, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    entry = call(fs, proto.LOOKUP, b"f\0")
    assert entry is not None and reply_error(entry) == 0
    nodeid = struct.unpack_from("<Q", entry, 16)[0]
    opened = call(fs, proto.OPEN, struct.pack("<II", os.O_RDWR, 0), nodeid=nodeid)
    assert opened is not None
    fh = struct.unpack_from("<Q", opened, 16)[0]
    for opcode, body in [
        (proto.FSYNC, struct.pack("<QII", fh, 0, 0)),
        (proto.FLUSH, struct.pack("<QIIQ", fh, 0, 0, 7)),
        (proto.SETLK, proto.LK_IN.pack(fh, 7, 0, proto.OFFSET_MAX, 1, 1, 0, 0)),
        (proto.GETLK, proto.LK_IN.pack(fh, 8, 0, proto.OFFSET_MAX, 1, 1, 0, 0)),
        (proto.SETLK, proto.LK_IN.pack(fh, 7, 0, 0, 2, 1, proto.LK_FLOCK, 0)),
        (proto.SETLK, proto.LK_IN.pack(fh, 7, 0, proto.OFFSET_MAX, 2, 1, 0, 0)),
    ]:
        assert reply_error(call(fs, opcode, body, nodeid=nodeid)) == 0, proto.OPCODE_NAMES[opcode]


def test_names_cannot_escape(fs: Filesystem, tmp_path: Path) -> None:
    for name in (b"..", b".", b"a/../..", b"/etc", b""):
        assert reply_error(call(fs, proto.LOOKUP, name + b"\0")) == errno.EINVAL, name
        assert reply_error(call(fs, proto.MKDIR, struct.pack("<II", 0o755, 0) + name + b"\0")) == errno.EINVAL
    os.symlink("/etc/passwd", tmp_path / "abs")
    entry = call(fs, proto.LOOKUP, b"abs\0")
    assert entry is not None and reply_error(entry) == 0
    nodeid = struct.unpack_from("<Q", entry, 16)[0]
    mode = struct.unpack_from("<I", entry, 40 + 16 + 60)[0]
    assert mode & 0o170000 == 0o120000  # the symlink itself, not /etc/passwd
    assert reply_error(call(fs, proto.OPEN, struct.pack("<II", os.O_RDONLY, 0), nodeid=nodeid)) == errno.ELOOP
    # Creating "through" a symlink is refused rather than followed on the host.
    body = struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o644, 0, 0) + b"abs\0"
    assert reply_error(call(fs, proto.CREATE, body)) in (errno.ELOOP, errno.EEXIST)


def test_unknown_node_ids_are_stale(fs: Filesystem) -> None:
    assert reply_error(call(fs, proto.GETATTR, bytes(16), nodeid=999)) == errno.ESTALE


def test_lookup_counts_are_exact(fs: Filesystem, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    os.link(tmp_path / "f", tmp_path / "g")
    e1, e2 = call(fs, proto.LOOKUP, b"f\0"), call(fs, proto.LOOKUP, b"g\0")
    assert e1 is not None and e2 is not None
    nodeid = struct.unpack_from("<Q", e1, 16)[0]
    assert struct.unpack_from("<Q", e2, 16)[0] == nodeid  # hard links share a node
    assert fs.inodes.get(nodeid).nlookup == 2
    call(fs, proto.FORGET, struct.pack("<Q", 1), nodeid=nodeid)
    assert fs.inodes.get(nodeid).nlookup == 1
    call(fs, proto.BATCH_FORGET, struct.pack("<II", 1, 0) + struct.pack("<QQ", nodeid, 1))
    with pytest.raises(OSError):
        fs.inodes.get(nodeid)


def test_resent_requests_are_not_executed_twice(tmp_path: Path) -> None:
    session = Session(1, str(tmp_path), False, Workers(1, 1))
    try:
        batch: list[bytes] = []
        SERVER_THREAD.submit(session.process, req(proto.INIT, INIT_BODY, unique=1), batch).result()
        mkdir = req(proto.MKDIR, struct.pack("<II", 0o755, 0) + b"d\0", unique=10)
        SERVER_THREAD.submit(session.process, mkdir, batch).result()
        SERVER_THREAD.submit(session.process, mkdir, batch).result()  # re-sent after a reconnect
        assert [reply_error(r) for r in batch[1:]] == [0, 0]
        assert batch[1] == batch[2]
    finally:
        session.close()


def _read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """`count` replies from the server's end of a stream, and nothing but whole replies."""
    sock.settimeout(30)  # generous: the replies take milliseconds
    buf = b""
    frames: list[bytes] = []
    while len(frames) < count:
        chunk = sock.recv(4096)
        assert chunk, f"the stream closed after {len(frames)} replies"
        buf += chunk
        got, used = proto.split_frames(buf, proto.MIN_REPLY)
        frames += got
        buf = buf[used:]
    assert buf == b""
    return frames


def test_fsyncs_are_answered_once_each_through_the_stream(tmp_path: Path) -> None:
    session = Session(1, str(tmp_path), False, Workers(2, 2))
    ours, theirs = socket.socketpair()
    session.attach(Connection(theirs))
    try:
        batch: list[bytes] = []
        SERVER_THREAD.submit(session.process, req(proto.INIT, INIT_BODY, unique=1), batch).result()
        create = req(proto.CREATE, struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o644, 0, 0) + b"f\0", unique=2)
        SERVER_THREAD.submit(session.process, create, batch).result()
        assert reply_error(batch[-1]) == 0
        nodeid, = struct.unpack_from("<Q", batch[-1], proto.OUT_HEADER.size)
        fh, = struct.unpack_from("<Q", batch[-1], proto.OUT_HEADER.size + proto.ENTRY_OUT.size)
        answered = len(batch)
        open_fds = len(os.listdir("/proc/self/fd"))
        # One thread's FSYNC of the open handle, two others' (a group), and one of a handle the server does not
        # know (synced by reopening the node).
        for unique, pid, handle in ((3, 10, fh), (4, 11, fh), (5, 12, fh), (6, 13, 999)):
            fsync = proto.IN_HEADER.pack(56, proto.FSYNC, unique, nodeid, os.geteuid(), os.getegid(), pid, 0, 0)
            SERVER_THREAD.submit(session.process, fsync + struct.pack("<QII", handle, 0, 0), batch).result()
        assert len(batch) == answered, "an FSYNC was answered inline"
        replies = _read_replies(ours, 4)
        assert sorted((proto.OUT_HEADER.unpack_from(r)[2], reply_error(r)) for r in replies) == [
            (3, 0), (4, 0), (5, 0), (6, 0)]
        ours.settimeout(0.5)
        with pytest.raises(TimeoutError):
            ours.recv(4096)  # and nothing more
        eventually(lambda: len(os.listdir("/proc/self/fd")) == open_fds,
                   "the fds taken for the sync groups closed")  # right after the replies are sent
    finally:
        session.close()
        ours.close()


def test_server_survives_garbage_and_disconnects(tmp_path: Path) -> None:
    server = Server(str(tmp_path), watch=False)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sock"))
    listener.listen()
    t = threading.Thread(target=server.serve_forever, args=(listener,), daemon=True)
    t.start()
    try:
        for garbage in (b"not a hello at all", proto.HELLO.pack(proto.MAGIC, 5, 0, 0) + b"\xff" * 64,
                        proto.HELLO.pack(proto.MAGIC, 6, 0, 0) + req(proto.INIT, INIT_BODY)[:50]):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(tmp_path / "sock"))
            s.sendall(garbage)
            s.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp_path / "sock"))
        s.settimeout(5)
        s.sendall(proto.HELLO.pack(proto.MAGIC, 7, 0, 0))
        assert s.recv(16)[:8] == proto.MAGIC
        s.sendall(req(proto.INIT, INIT_BODY, unique=1) + req(proto.GETATTR, bytes(16), unique=2)
                  + req(4242, b"", unique=3))
        frames = _read_replies(s, 3)  # nothing but whole replies
        errors = {proto.OUT_HEADER.unpack_from(f)[2]: -proto.OUT_HEADER.unpack_from(f)[1] for f in frames}
        assert errors == {1: 0, 2: 0, 3: errno.ENOSYS}
        s.close()
    finally:
        server.close()
        listener.close()
