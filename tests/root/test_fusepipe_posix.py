"""fuse-pipe on the host: `fcvm fuse-pipe mount-local` compared with plain ext4, as root and as uid 65534.

The server acts on the host as the request's uid without any capability (see fcvm.fusepipe.fs), so what root
does on the mount is compared with what root without capabilities does on ext4.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcvm.fusepipe import Server
from fcvm_wire.fusepipe import proto
from tests.root import test_fusepipe_hostile as hostile
from tests.root import test_fusepipe_scenario as scenario
from tests.support import eventually, require, require_root

SCENARIO = Path(scenario.__file__)
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534


def _mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


class MountLocal:
    def __init__(self, src: Path, mnt: Path, *extra: str, cache_timeout: float | None = None) -> None:
        self.src, self.mnt = src, mnt
        env = dict(os.environ)
        if cache_timeout is not None:
            env["FCVM_FUSEPIPE_TIMEOUT"] = str(cache_timeout)
        self.proc = subprocess.Popen([sys.executable, "-m", "fcvm", "fuse-pipe", "mount-local", str(src), str(mnt),
                                      *extra], stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 20
        while not _mounted(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"mount-local did not come up: {self.proc.communicate()[1]}")
            time.sleep(0.05)
        os.stat(mnt)  # INIT done

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
            raise
        return rc


def _prereqs() -> None:
    require_root()
    require(os.path.exists("/dev/fuse"), "needs /dev/fuse")


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(served dir, mount point, plain reference dir), all on the same host filesystem."""
    _prereqs()
    base = Path("/var/tmp") / f"fp-{os.getpid()}-{tmp_path.name}"
    src, mnt, ref = base / "src", base / "mnt", base / "ref"
    for d in (src, mnt, ref):
        d.mkdir(parents=True)
    os.chmod(base, 0o755)
    yield src, mnt, ref
    if _mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mount(dirs: tuple[Path, Path, Path]) -> Iterator[MountLocal]:
    src, mnt, _ = dirs
    m = MountLocal(src, mnt)
    yield m
    assert m.stop() == 0
    assert not _mounted(mnt)


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


_PR_CAPBSET_DROP = 24


def _as_root_without_capabilities() -> None:
    """Empty the bounding set: after exec, uid 0 has no capability at all (what the server makes guest root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    cap = 0
    while libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:  # EINVAL past the last capability
        cap += 1
    assert cap > 30


class RunAs(StrEnum):
    ROOT = "root"
    ROOT_WITHOUT_CAPABILITIES = "root-without-capabilities"
    NOBODY = "nobody"


_BECOME: dict[RunAs, Callable[[], None] | None] = {
    RunAs.ROOT: None, RunAs.ROOT_WITHOUT_CAPABILITIES: _as_root_without_capabilities, RunAs.NOBODY: _as_nobody}


def _run_scenario(*args: str, run_as: RunAs) -> object:
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3 for the scenario runs")
    res = subprocess.run([SYSTEM_PYTHON, str(SCENARIO), *args], capture_output=True, text=True, timeout=120,
                         preexec_fn=_BECOME[run_as], cwd="/")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _compare(ours: list, ext4: list) -> None:
    diffs = [(a[0], a[1], b[1]) for a, b in zip(ours, ext4, strict=True) if a != b]
    assert not diffs, "fuse-pipe differs from ext4:\n" + "\n".join(f"  {d}" for d in diffs)


# Where ext4 keeps a setuid or setgid bit the caller asked for, fuse-pipe has none: the server never sets one
# on the host. (label: (fuse-pipe's result, ext4's result))
_SETID_NEVER_SET = {
    "chmod.basic": (["ok", "-rwxr-xr-x"], ["ok", "-rwsr-xr-x"]),
    "chmod.sgid_nonmember": (["ok", "-rwxr-xr-x"], ["ok", "-rwxr-sr-x"]),
    "mkdir.sgid_inherit": (["ok", ["drwxr-xr-x", True]], ["ok", ["drwxr-sr-x", True]]),
}


@pytest.mark.parametrize("uid", [0, NOBODY], ids=["root", "nobody"])
def test_posix_checks_match_ext4(mount: MountLocal, dirs: tuple[Path, Path, Path], uid: int) -> None:
    src, mnt, ref = dirs
    work, refwork = mnt / "w", ref / "w"
    for d in (src / "w", refwork):  # made on the host: root on the mount cannot give a directory away
        d.mkdir()
        os.chown(d, uid, uid)
    # Root on the mount is the guest's root, with every capability in its own kernel; on the host the server
    # does what root without capabilities may.
    ext4 = _run_scenario("posix", str(refwork), run_as=RunAs.ROOT_WITHOUT_CAPABILITIES if uid == 0 else RunAs.NOBODY)
    ours = _run_scenario("posix", str(work), run_as=RunAs.ROOT if uid == 0 else RunAs.NOBODY)
    assert isinstance(ours, list) and isinstance(ext4, list)
    results, reference = dict(ours), dict(ext4)
    assert {label: (results.pop(label), reference.pop(label)) for label in _SETID_NEVER_SET} == {
        label: (want_ours, want_ext4) for label, (want_ours, want_ext4) in _SETID_NEVER_SET.items()}
    _compare(list(results.items()), list(reference.items()))
    results = dict(ours)
    # Sanity: the scenario really exercised the operations (not everything failing the same way).
    assert results["open.creat"] == ["ok", "-rw-r-----"]
    assert results["fsync.file"] == ["ok", None]
    assert results["lock.posix"] == ["ok", ["EAGAIN", "got"]] or results["lock.posix"][1][0] in ("EAGAIN", "EACCES")
    assert results["lock.flock"][1][0] == "EWOULDBLOCK" or results["lock.flock"][1][0] == "EAGAIN"
    # No device nodes and no giving files away on the host, whatever the guest's root may do in its kernel.
    assert results["mknod.chr"] == results["mknod.blk"] == ["err", "EPERM"]
    assert results["chown.other"] == ["err", "EPERM"]


_NAMES = ["a", "b", "d", "d/a", "d/e", "e/a"]
_name = st.sampled_from(_NAMES)
_data = st.binary(max_size=64).map(bytes.hex)
_mode = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o000, 0o1777])
_op = st.one_of(
    st.tuples(st.just("mkdir"), _name, st.sampled_from([0o755, 0o700, 0o2775])),
    st.tuples(st.just("create"), _name, _mode, _data),
    st.tuples(st.just("write"), _name, st.integers(0, 100), _data, st.booleans()),
    st.tuples(st.just("truncate"), _name, st.integers(0, 200)),
    st.tuples(st.just("rename"), _name, _name),
    st.tuples(st.just("link"), _name, _name),
    st.tuples(st.just("unlink"), _name),
    st.tuples(st.just("rmdir"), _name),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../a", "/etc", "d", "nowhere"]), _name),
    st.tuples(st.just("chmod"), _name, _mode),
    st.tuples(st.just("read"), _name),
    st.tuples(st.just("stat"), _name),
    st.tuples(st.just("lstat"), _name),
    st.tuples(st.just("listdir"), st.sampled_from([".", "d", "e"])),
    st.tuples(st.just("readlink"), _name),
    st.tuples(st.just("mkfifo"), _name, st.sampled_from([0o644, 0o600])),
    st.tuples(st.just("utime"), _name, st.integers(-2**40, 2**40), st.integers(0, 2**62)),
    st.tuples(st.just("xattr"), _name, _data),
).map(list)


@pytest.mark.parametrize("run_as", [RunAs.ROOT_WITHOUT_CAPABILITIES, RunAs.NOBODY], ids=["root", "nobody"])
def test_random_operations_match_plain_directory(mount: MountLocal, dirs: tuple[Path, Path, Path],
                                                 run_as: RunAs) -> None:
    _, mnt, ref = dirs
    runs: list[int] = []

    @settings(max_examples=100 if run_as == RunAs.ROOT_WITHOUT_CAPABILITIES else 30, deadline=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(_op, min_size=4, max_size=40))
    def check(ops: list[list[object]]) -> None:
        runs.append(len(ops))
        # A new pair of directories each time: root on the mount cannot remove what nobody made there.
        a, b = mnt / f"x{len(runs)}", ref / f"x{len(runs)}"
        for d in (a, b):
            d.mkdir()
            os.chmod(d, 0o777)
        diff = _run_scenario("ops", str(a), str(b), json.dumps(ops), run_as=run_as)
        assert diff == [], f"divergence: {diff}"

    check()
    assert len(runs) >= 10 and sum(runs) > 100, runs
    print(f"{len(runs)} sequences, {sum(runs)} operations")


def test_host_changes_show_up_at_once(dirs: tuple[Path, Path, Path]) -> None:
    """Host-side changes reach the mount by invalidation: the kernel's caches here would keep a stale view for an
    hour, so whatever shows up before then was invalidated."""
    src, mnt, _ = dirs
    m = MountLocal(src, mnt, cache_timeout=3600)
    try:
        (src / "f").write_text("one")
        assert (mnt / "f").read_text() == "one"
        assert not (mnt / "new").exists()  # negative entry now cached
        os.listdir(mnt)
        (src / "f").write_text("two!")
        (src / "new").write_text("n")
        os.mkdir(src / "sub")
        (src / "sub" / "x").write_text("x")
        eventually(lambda: (mnt / "f").read_text() == "two!", "new content")
        eventually(lambda: (mnt / "new").read_text() == "n", "a new file")
        eventually(lambda: (mnt / "sub" / "x").read_text() == "x", "a new directory")
        os.chmod(src / "f", 0o600)
        os.unlink(src / "new")
        os.rename(src / "sub", src / "sub2")
        eventually(lambda: (mnt / "f").stat().st_mode & 0o777 == 0o600, "a new mode")
        eventually(lambda: not (mnt / "new").exists(), "a file gone")
        eventually(lambda: sorted(os.listdir(mnt)) == ["f", "sub2"], "a directory renamed")
        assert (mnt / "sub2" / "x").read_text() == "x"
    finally:
        assert m.stop() == 0


def test_mount_is_nosuid_and_nodev(mount: MountLocal, dirs: tuple[Path, Path, Path]) -> None:
    """A setuid file or device node in the served directory grants nothing on the mount."""
    _, mnt, _ = dirs
    with open("/proc/self/mountinfo") as f:
        options = next(line.split()[5] for line in f if line.split()[4] == str(mnt))
    assert {"nosuid", "nodev"} <= set(options.split(","))


def test_paths_never_escape_the_served_directory(dirs: tuple[Path, Path, Path]) -> None:
    """Crafted requests straight to the server (no kernel, no pathlib in between) reach nothing outside the
    served directory: not '..' nor names with '/', not through symlinks, not with made-up node ids or file
    handles."""
    src, _, _ = dirs
    base = src.parent
    secret = base / "outside"
    secret.write_bytes(b"the secret")
    (base / "outside_dir").mkdir()
    (base / "outside_dir" / "f").write_bytes(b"the other secret")
    os.symlink("../outside", src / "rel")
    os.symlink(str(secret), src / "abs")
    os.symlink("../outside_dir", src / "reldir")
    os.symlink("/", src / "root")
    (src / "sub").mkdir()
    for p in (secret, base / "outside_dir" / "f"):  # atime before mtime: relatime records any read
        os.utime(p, ns=(0, p.stat().st_mtime_ns))

    def outside() -> dict[str, tuple[object, ...]]:
        """Everything outside `src` (no content: reading it would change the atimes watched)."""
        return {str(p): (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns,
                         st.st_ctime_ns, sorted(os.listxattr(p, follow_symlinks=False)))
                for p in [base, *base.rglob("*")] if src not in p.parents and p != src
                for st in [os.lstat(p)]}

    before = outside()
    server = Server(str(src))
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve_connection, args=(theirs,), daemon=True)
    thread.start()
    c = hostile.RawClient(ours)
    try:
        c.start(1)
        sub, rel, reldir, root_link = (c.lookup(n) for n in ("sub", "rel", "reldir", "root"))
        answers: list[tuple[str, int, int]] = []

        def expect(what: str, err: int, opcode: int, body: bytes = b"", nodeid: int = proto.ROOT_ID) -> None:
            answers.append((what, err, c.call(opcode, body, nodeid=nodeid)[0]))

        for parent in (proto.ROOT_ID, sub):
            for name in (b"..", b".", b"../outside", b"sub/../../outside", b"/etc/passwd", b""):
                expect(f"lookup {name!r}", errno.EINVAL, proto.LOOKUP, name + b"\0", parent)
        for what, opcode, body in [
            ("mkdir", proto.MKDIR, hostile.mkdir_body("../evil", 0o755)),
            ("create", proto.CREATE, hostile.create_body("../evil", 0o644)),
            ("mknod", proto.MKNOD, hostile.mknod_body("../evil", 0o10644)),
            ("symlink", proto.SYMLINK, b"../evil\0target\0"),
            ("link", proto.LINK, struct.pack("<Q", rel) + b"../evil\0"),
            ("rename", proto.RENAME, struct.pack("<Q", proto.ROOT_ID) + b"sub\0../moved\0"),
            ("unlink", proto.UNLINK, b"../outside\0"),
        ]:
            expect(f"{what} with a '..' name", errno.EINVAL, opcode, body)
        # Symlinks are the guest's to follow, never the host's.
        expect("open through a symlink", errno.ELOOP, proto.OPEN, struct.pack("<II", os.O_RDONLY, 0), rel)
        expect("open through a symlink to write", errno.ELOOP, proto.OPEN,
               struct.pack("<II", os.O_WRONLY | os.O_TRUNC, 0), rel)
        expect("create over a symlink", errno.ELOOP, proto.CREATE,
               hostile.create_body("abs", 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        expect("truncate a symlink", errno.EINVAL, proto.SETATTR, hostile.setattr_body(valid=proto.FATTR_SIZE), rel)
        expect("chmod a symlink", errno.EOPNOTSUPP, proto.SETATTR,
               hostile.setattr_body(valid=proto.FATTR_MODE, mode=0o777), rel)
        expect("setxattr on a symlink", errno.EPERM, proto.SETXATTR, hostile.setxattr_body("user.x", b"1"), rel)
        expect("opendir through a symlink", errno.ENOTDIR, proto.OPENDIR, struct.pack("<II", os.O_RDONLY, 0), reldir)
        expect("lookup under a symlink", errno.ENOTDIR, proto.LOOKUP, b"f\0", reldir)
        expect("lookup under a symlink to /", errno.ENOTDIR, proto.LOOKUP, b"etc\0", root_link)
        expect("create under a symlink", errno.ENOTDIR, proto.CREATE, hostile.create_body("new", 0o644), reldir)
        expect("mkdir under a symlink", errno.ENOTDIR, proto.MKDIR, hostile.mkdir_body("new", 0o755), reldir)
        expect("unlink under a symlink", errno.ENOTDIR, proto.UNLINK, b"f\0", reldir)
        # Node ids and file handles the server never issued.
        for nodeid in (0, 999, 2**64 - 1):
            expect(f"getattr of node {nodeid}", errno.ESTALE, proto.GETATTR, bytes(16), nodeid)
            expect(f"lookup in node {nodeid}", errno.ESTALE, proto.LOOKUP, b"outside\0", nodeid)
            expect(f"create in node {nodeid}", errno.ESTALE, proto.CREATE, hostile.create_body("x", 0o644), nodeid)
        expect("read a made-up handle", errno.EBADF, proto.READ, struct.pack("<QQIIQII", 77, 0, 4096, 0, 0, 0, 0))
        expect("write a made-up handle", errno.EBADF, proto.WRITE,
               struct.pack("<QQIIQII", 77, 0, 1, 0, 0, 0, 0) + b"x")
        expect("readdir a made-up handle", errno.EBADF, proto.READDIR,
               struct.pack("<QQIIQII", 77, 0, 4096, 0, 0, 0, 0))
        assert [(what, errno.errorcode.get(got)) for what, _, got in answers] == [
            (what, errno.errorcode[want]) for what, want, _ in answers]
        assert c.call(proto.READLINK, nodeid=rel) == (0, b"../outside")  # the link itself is the guest's to read
    finally:
        c.close()
        thread.join(30)
        server.close()
    assert outside() == before
    assert secret.read_bytes() == b"the secret"


def test_read_only_mount_refuses_writes(dirs: tuple[Path, Path, Path]) -> None:
    src, mnt, _ = dirs
    (src / "f").write_text("ro")
    m = MountLocal(src, mnt, "--ro")
    try:
        assert (mnt / "f").read_text() == "ro"
        for attempt in (lambda: (mnt / "g").write_text("x"), lambda: os.mkdir(mnt / "d"),
                        lambda: os.unlink(mnt / "f"), lambda: os.chmod(mnt / "f", 0o600),
                        lambda: open(mnt / "f", "w")):  # noqa: SIM115
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == 30  # EROFS
    finally:
        assert m.stop() == 0
    assert (src / "f").read_text() == "ro"


def test_sigint_unmounts_even_with_open_files(dirs: tuple[Path, Path, Path]) -> None:
    src, mnt, _ = dirs
    (src / "f").write_text("x")
    m = MountLocal(src, mnt)
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        assert m.stop(signal.SIGINT) == 0
        assert not _mounted(mnt)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the connection was aborted under it
            os.close(fd)


def test_open_but_deleted_and_hard_links(mount: MountLocal, dirs: tuple[Path, Path, Path]) -> None:
    src, mnt, _ = dirs
    with open(mnt / "a", "w+") as f:
        os.link(mnt / "a", mnt / "b")
        assert os.stat(mnt / "a").st_ino == os.stat(mnt / "b").st_ino
        os.unlink(mnt / "a")
        os.unlink(mnt / "b")
        f.write("data")
        f.flush()
        f.seek(0)
        assert f.read() == "data"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(src) == []
