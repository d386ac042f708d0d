"""fuse-pipe on the host: `fcvm fuse-pipe mount-local` compared with plain ext4, as root and as uid 65534."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.root import test_fusepipe_scenario as scenario
from tests.support import require, require_root

SCENARIO = Path(scenario.__file__)
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534


def _mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


class MountLocal:
    def __init__(self, src: Path, mnt: Path, *extra: str) -> None:
        self.src, self.mnt = src, mnt
        self.proc = subprocess.Popen([sys.executable, "-m", "fcvm", "fuse-pipe", "mount-local", str(src), str(mnt),
                                      *extra], stderr=subprocess.PIPE, text=True)
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


def _run_scenario(*args: str, uid: int | None = None) -> object:
    require(os.path.exists(SYSTEM_PYTHON), "needs the system python3 for the unprivileged runs")
    res = subprocess.run([SYSTEM_PYTHON, str(SCENARIO), *args], capture_output=True, text=True, timeout=120,
                         preexec_fn=_as_nobody if uid == NOBODY else None, cwd="/")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _compare(ours: list, ext4: list) -> None:
    diffs = [(a[0], a[1], b[1]) for a, b in zip(ours, ext4, strict=True) if a != b]
    assert not diffs, "fuse-pipe differs from ext4:\n" + "\n".join(f"  {d}" for d in diffs)


@pytest.mark.parametrize("uid", [0, NOBODY], ids=["root", "nobody"])
def test_posix_checks_match_ext4(mount: MountLocal, dirs: tuple[Path, Path, Path], uid: int) -> None:
    _, mnt, ref = dirs
    work, refwork = mnt / "w", ref / "w"
    for d in (work, refwork):
        d.mkdir()
        os.chown(d, uid, uid)
    ext4 = _run_scenario("posix", str(refwork), uid=uid)
    ours = _run_scenario("posix", str(work), uid=uid)
    assert isinstance(ours, list) and isinstance(ext4, list)
    _compare(ours, ext4)
    results = dict((k, v) for k, v in ours)
    # Sanity: the scenario really exercised the operations (not everything failing the same way).
    assert results["open.creat"] == ["ok", "-rw-r-----"]
    assert results["fsync.file"] == ["ok", None]
    assert results["lock.posix"] == ["ok", ["EAGAIN", "got"]] or results["lock.posix"][1][0] in ("EAGAIN", "EACCES")
    assert results["lock.flock"][1][0] == "EWOULDBLOCK" or results["lock.flock"][1][0] == "EAGAIN"
    if uid == 0:
        assert results["mknod.chr"] == ["ok", ["crw-------", 1, 3]]
        assert results["chown.other"] == ["ok", [12345, 12345]]
    else:
        assert results["mknod.chr"] == ["err", "EPERM"]
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


def _fresh(*dirs: Path) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True) if d.exists() else None
        d.mkdir()
        os.chmod(d, 0o777)


@pytest.mark.parametrize("uid", [0, NOBODY], ids=["root", "nobody"])
def test_random_operations_match_plain_directory(mount: MountLocal, dirs: tuple[Path, Path, Path], uid: int) -> None:
    _, mnt, ref = dirs
    a, b = mnt / "x", ref / "x"
    runs: list[int] = []

    @settings(max_examples=100 if uid == 0 else 30, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_op, min_size=4, max_size=40))
    def check(ops: list[list[object]]) -> None:
        runs.append(len(ops))
        _fresh(a, b)
        if uid == 0:
            diff = scenario.run_ops(str(a), str(b), ops)
        else:
            diff = _run_scenario("ops", str(a), str(b), json.dumps(ops), uid=uid)
        assert diff == [], f"divergence: {diff}"

    check()
    assert len(runs) >= 10 and sum(runs) > 100, runs
    print(f"{len(runs)} sequences, {sum(runs)} operations")


def test_host_changes_show_up_at_once(mount: MountLocal, dirs: tuple[Path, Path, Path]) -> None:
    src, mnt, _ = dirs
    (src / "f").write_text("one")
    assert (mnt / "f").read_text() == "one"
    assert not (mnt / "new").exists()  # negative entry now cached
    os.listdir(mnt)
    (src / "f").write_text("two!")
    (src / "new").write_text("n")
    os.mkdir(src / "sub")
    (src / "sub" / "x").write_text("x")
    deadline = time.monotonic() + 0.3  # far below the 1 s cache timeouts
    while time.monotonic() < deadline:
        try:
            if ((mnt / "f").read_text() == "two!" and (mnt / "new").exists()
                    and (mnt / "sub" / "x").read_text() == "x"):
                break
        except OSError:
            pass
        time.sleep(0.01)
    assert (mnt / "f").read_text() == "two!"
    assert (mnt / "new").read_text() == "n"
    os.chmod(src / "f", 0o600)
    os.unlink(src / "new")
    os.rename(src / "sub", src / "sub2")
    time.sleep(0.1)
    assert (mnt / "f").stat().st_mode & 0o777 == 0o600
    assert not (mnt / "new").exists()
    assert sorted(os.listdir(mnt)) == ["f", "sub2"]
    assert (mnt / "sub2" / "x").read_text() == "x"


def test_paths_never_escape_the_served_directory(mount: MountLocal, dirs: tuple[Path, Path, Path]) -> None:
    src, mnt, _ = dirs
    secret = src.parent / "outside"
    secret.write_text("secret")
    os.symlink("../outside", src / "rel")
    os.symlink(str(secret), src / "abs")
    os.symlink("/", src / "root")
    # Symlinks are resolved by the mounting kernel, i.e. relative to the mount, never on the host.
    assert os.readlink(mnt / "abs") == str(secret)
    assert not (mnt / "rel").exists() or (mnt / "rel").resolve() == (mnt.parent / "outside").resolve()
    assert (mnt / "root").resolve() == Path("/")
    with pytest.raises(OSError):
        os.stat(mnt / ".." / "mnt" / ".." / "outside-not-there")
    # Writing through a symlink creates the target relative to the mount's view, not the host's.
    os.symlink("/var/tmp/fp-escape-target", src / "w")
    with pytest.raises(OSError):
        os.open(mnt / "w", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    assert secret.read_text() == "secret"


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
