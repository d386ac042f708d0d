"""fcvm-jailer-mock against the real kernel: the jailed program's identity, capabilities, view of the filesystem,
network namespace, cgroups, arguments and process, bad input, and fc-mock itself running jailed.

The jailed program is mostly a small Python "exec-file" (named like Firecracker, as the jailer demands) that
reports what it sees as JSON on stdout. Every jail lives in a per-test temporary chroot base; cgroups and
network namespaces are created under unique names and removed after the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import fcvm
from fcvm_standins.fc_mock import caps
from fcvm_standins.fc_mock.spec import SpecNotFoundError, find_spec
from tests.support import require, require_root

JAILER = Path(sys.executable).parent / "fcvm-jailer-mock"
FC_MOCK = Path(sys.executable).parent / "fcvm-fc-mock"
SYSTEM_PYTHON = Path("/usr/bin/python3")
UID, GID = 47001, 47002  # distinct, so a swapped uid/gid shows
MMDS_MASK = caps.mask(caps.MMDS_CAPS)
CGROUP2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.controllers").exists() \
    else Path("/sys/fs/cgroup")

# Reports what the jailed process sees. Standard library only: it runs on the system Python.
PROBE = r'''
import json, os, resource, stat, sys

def caps():
    sets = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                sets[key] = int(value, 16)
    return sets

def device(path):
    st = os.stat(path)
    return {"uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode), "char": stat.S_ISCHR(st.st_mode),
            "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)]}

spec = os.environ.get("FCVM_FC_SPEC", "")
print(json.dumps({
    "pid": os.getpid(), "uid": list(os.getresuid()), "gid": list(os.getresgid()), "groups": os.getgroups(),
    "caps": caps(), "cwd": os.getcwd(), "root": sorted(os.listdir("/")), "argv": sys.argv,
    "netns": os.stat("/proc/self/ns/net").st_ino, "cgroup": open("/proc/self/cgroup").read().splitlines(),
    "env": sorted(k for k in os.environ if k != "LC_CTYPE"),  # LC_CTYPE: set by this Python (PEP 538)
    "spec_readable": bool(spec) and os.access(spec, os.R_OK),
    "exists": {p: os.path.exists(p) for p in sys.argv[1:] if p.startswith("/")},
    "tun": device("/dev/net/tun"), "null": device("/dev/null"),
    "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    "fsize": list(resource.getrlimit(resource.RLIMIT_FSIZE)),
}))
'''

# Runs on the fcvm interpreter inside the jail: does what fc-mock's MMDS does with the two capabilities, runs
# fc-mock's own start (which clears the ambient set), then has a child (as QEMU would be) try the same.
CAPS_PROBE = r'''
import contextlib, io, json, socket, subprocess, sys
from pyroute2 import IPRoute
from fcvm_standins.fc_mock import main as fc_mock_main

CHILD = """
import json, socket
sets = {k: int(v, 16) for k, _, v in (l.partition(':') for l in open('/proc/self/status')) if k.startswith('Cap')}
try:
    socket.socket().bind(('169.254.169.254', 81)); bound = True
except PermissionError:
    bound = False
print(json.dumps({'caps': sets, 'bound_low_port': bound}))
"""

def caps():
    return {k: int(v, 16) for k, _, v in (l.partition(":") for l in open("/proc/self/status")) if k.startswith("Cap")}

with IPRoute() as ipr:  # CAP_NET_ADMIN
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.link("set", index=lo, state="up")
    ipr.addr("add", index=lo, address="169.254.169.254", prefixlen=32)
listener = socket.socket()
listener.bind(("169.254.169.254", 80))  # CAP_NET_BIND_SERVICE
before = caps()
with contextlib.redirect_stdout(io.StringIO()):
    fc_mock_main.main(["--version"])
after = caps()
child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
print(json.dumps({"before": before, "after": after, "child": json.loads(child.stdout)}))
'''


@dataclass
class Result:
    pid: int
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> dict[str, Any]:
        assert self.returncode == 0, f"jailer exited {self.returncode}: {self.stderr}"
        return json.loads(self.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    require_root()
    require(JAILER.is_file(), f"needs {JAILER} (pip install -e . installs the fcvm-jailer-mock script)")
    require(SYSTEM_PYTHON.is_file(), f"needs {SYSTEM_PYTHON} for the fake exec-file")
    require(Path("/proc/self/ns/net").exists(), "needs network namespaces")


def _mounts_under(path: Path) -> list[str]:
    """Host mount points at or below `path`. Other tests mount and unmount concurrently on this machine, so a
    whole-table before/after comparison would be flaky; everything the jailer mounts is below its chroot base."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[4])
        if point == str(path) or point.startswith(f"{path}/"):
            points.append(point)
    return points


@pytest.fixture
def work() -> Iterator[Path]:
    """A private directory holding `base/` (the chroot base) and `bin/` (exec-files), removed afterwards.
    Short, unlike pytest's tmp_path: fc-mock's API socket inside the jail must fit in an AF_UNIX address."""
    path = Path(tempfile.mkdtemp(prefix="fcvm-jailer-"))
    (path / "base").mkdir()
    (path / "bin").mkdir()
    yield path
    leaked = _mounts_under(path)
    # Never rmtree through a mount: a leaked bind of /usr would be emptied on the host.
    assert not leaked, f"mounts leaked to the host: {leaked}"
    shutil.rmtree(path)


def _exec_file(work: Path, name: str = "firecracker-probe", body: str = PROBE,
               interpreter: str = str(SYSTEM_PYTHON)) -> Path:
    path = work / "bin" / name
    path.write_text(f"#!{interpreter}\n{body}")
    path.chmod(0o755)
    return path


def _jail_id() -> str:
    return f"t-{secrets.token_hex(6)}"


def _run(work: Path, exec_file: Path, jail_id: str, *flags: str, extra: Sequence[str] = (),
         env: dict[str, str] | None = None, umask: int = -1) -> Result:
    argv = [str(JAILER), "--id", jail_id, "--exec-file", str(exec_file), "--uid", str(UID), "--gid", str(GID),
            "--chroot-base-dir", str(work / "base"), *flags]
    if extra:
        argv += ["--", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, umask=umask)
    stdout, stderr = proc.communicate(timeout=120)
    return Result(proc.pid, proc.returncode, stdout, stderr)


def _jail_root(work: Path, exec_file: Path, jail_id: str) -> Path:
    return work / "base" / exec_file.name / jail_id / "root"


# --- a successful jail ----------------------------------------------------------------------------------


def test_jailed_identity_view_args_and_process(work: Path) -> None:
    exe = _exec_file(work)
    jail_id = _jail_id()
    root = _jail_root(work, exe, jail_id)
    root.mkdir(parents=True)
    (root / "vmlinux").write_text("placed by fcvm before the jailer runs")
    secret = work / "outside-the-jail"
    secret.write_text("host only")
    project_file = Path(fcvm.__file__).resolve().parents[2] / "pyproject.toml"  # beside src/, not bound
    extra = ["--level", "Debug", str(secret), str(project_file), "/usr/bin", "/proc/self/status"]
    env = {**os.environ, "FCVM_TEST_PASSES": "1", "JAILER_TEST_DROPPED": "1"}

    result = _run(work, exe, jail_id, extra=extra, env=env)
    report = result.report()

    # Identity: the jail uid/gid, nothing else, and exactly fc-mock's two MMDS capabilities.
    assert report["uid"] == [UID] * 3
    assert report["gid"] == [GID] * 3
    assert report["groups"] == []
    assert report["caps"]["CapEff"] == MMDS_MASK
    assert report["caps"]["CapPrm"] == MMDS_MASK
    assert report["caps"]["CapAmb"] == MMDS_MASK

    # The same process (exec, no fork), as the jailer, which also records it in /<exec name>.pid.
    assert report["pid"] == result.pid
    assert (root / f"{exe.name}.pid").read_text() == str(result.pid)

    # argv: the jailer's own flags first, in its order, then everything after "--", untouched.
    argv = report["argv"]
    assert argv[:3] == [f"/{exe.name}", "--id", jail_id]
    assert argv[3::2][:3] == ["--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us"]
    assert all(value.isdigit() for value in argv[4:9:2])
    assert argv[9:] == extra

    # The view: / is the jail root, with fcvm's file, its own copy of the exec-file and the jailer's devices.
    assert report["cwd"] == "/"
    assert {exe.name, f"{exe.name}.pid", "vmlinux", "dev", "run", "usr", "etc", "proc", "tmp"} <= set(report["root"])
    assert report["tun"] == {"uid": UID, "gid": GID, "mode": 0o600, "char": True, "rdev": [10, 200]}
    assert report["null"] == {"uid": 0, "gid": 0, "mode": 0o666, "char": True, "rdev": [1, 3]}
    assert report["exists"] == {str(secret): False, str(project_file): False, "/usr/bin": True,
                                "/proc/self/status": True}
    copy = root / exe.name
    assert copy.read_bytes() == exe.read_bytes()
    assert copy.stat().st_ino != exe.stat().st_ino, "the exec-file must be copied, not linked"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o755
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == UID

    # The environment: only FCVM_* passes, plus the spec fc-mock needs, readable inside.
    assert "FCVM_TEST_PASSES" in report["env"] and "JAILER_TEST_DROPPED" not in report["env"]
    assert "PATH" not in report["env"] and "HOME" not in report["env"]
    try:
        find_spec()
    except SpecNotFoundError:
        pass
    else:
        assert "FCVM_FC_SPEC" in report["env"] and report["spec_readable"]

    # The jailer's default no-file limit; fsize untouched.
    assert report["nofile"] == [2048, 2048]
    assert _mounts_under(work) == []


def test_a_caller_with_umask_077_still_gets_a_jail_its_uid_can_use(work: Path) -> None:
    # The directories the jailer makes for the runtime binds lead to the interpreter and the API spec: the jailed
    # uid must be able to walk them.
    report = _run(work, _exec_file(work), _jail_id(), umask=0o077).report()
    assert report["uid"] == [UID] * 3
    try:
        find_spec()
    except SpecNotFoundError:
        return
    assert report["spec_readable"]


def test_resource_limits(work: Path) -> None:
    exe = _exec_file(work)
    report = _run(work, exe, _jail_id(), "--resource-limit", "no-file=1000",
                  "--resource-limit", "fsize=1048576").report()
    assert report["nofile"] == [1000, 1000]
    assert report["fsize"] == [1048576, 1048576]


def test_netns(work: Path) -> None:
    from pyroute2 import netns

    name = f"fcvm-jailer-{secrets.token_hex(4)}"
    netns.create(name)
    try:
        path = Path("/var/run/netns") / name
        report = _run(work, _exec_file(work), _jail_id(), "--netns", str(path)).report()
        assert report["netns"] == path.stat().st_ino
        assert report["netns"] != os.stat("/proc/self/ns/net").st_ino
    finally:
        netns.remove(name)


# --- cgroups --------------------------------------------------------------------------------------------


def _hugetlb_file() -> str | None:
    """A hugetlb limit file name (`hugetlb.2MB.max`): hugetlb is often the one v2 controller of a hybrid host."""
    sizes = sorted(int(p.name.removeprefix("hugepages-").removesuffix("kB"))
                   for p in Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB"))
    if not sizes:
        return None
    kb = sizes[0]
    size = f"{kb // 1048576}GB" if kb >= 1048576 else f"{kb // 1024}MB" if kb >= 1024 else f"{kb}KB"
    return f"hugetlb.{size}.max"


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    """A unique parent cgroup name; every cgroup below it, in any hierarchy, is removed afterwards (the
    processes in them have exited by then). A controller the jailer enabled at the v2 root is disabled again
    if it was off before, unless another user's cgroup needs it (then the write fails and is ignored)."""
    name = f"fcvm-jailer-test-{secrets.token_hex(4)}"
    root_control = CGROUP2 / "cgroup.subtree_control"
    enabled_before = set(root_control.read_text().split()) if root_control.exists() else set()
    yield name
    # v1 hierarchies and the hybrid unified one are directories of /sys/fs/cgroup; a pure v2 host's is itself.
    for top in [Path("/sys/fs/cgroup") / name, *(h / name for h in Path("/sys/fs/cgroup").iterdir())]:
        if top.is_dir():
            for cgroup in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                cgroup.rmdir()
            top.rmdir()
    if root_control.exists():
        for controller in set(root_control.read_text().split()) - enabled_before:
            with contextlib.suppress(OSError):
                root_control.write_text(f"-{controller}\n")


def test_cgroup_v2(work: Path, cgroup_parent: str) -> None:
    file = _hugetlb_file()
    available = set((CGROUP2 / "cgroup.controllers").read_text().split()) if CGROUP2.exists() else set()
    require(file is not None and "hugetlb" in available,
            "needs the hugetlb controller in the cgroup v2 hierarchy (the jailer only writes v2 files of an "
            "available controller)")
    assert file is not None
    jail_id = _jail_id()
    report = _run(work, _exec_file(work), jail_id, "--cgroup-version", "2", "--parent-cgroup", cgroup_parent,
                  "--cgroup", f"{file}=max").report()
    assert f"0::/{cgroup_parent}/{jail_id}" in report["cgroup"]
    cgroup = CGROUP2 / cgroup_parent / jail_id
    assert cgroup.is_dir()
    assert (cgroup / file).read_text().strip() == "max"
    assert "hugetlb" in (CGROUP2 / cgroup_parent / "cgroup.subtree_control").read_text().split()


def test_cgroup_v2_without_cgroup_flags_joins_an_existing_parent(work: Path, cgroup_parent: str) -> None:
    """The jailer's rule for v2 with no --cgroup: move into the parent cgroup if it exists, create nothing."""
    require(CGROUP2.exists(), "needs a cgroup2 mount")
    (CGROUP2 / cgroup_parent).mkdir()
    jail_id = _jail_id()
    report = _run(work, _exec_file(work), jail_id, "--cgroup-version", "2",
                  "--parent-cgroup", cgroup_parent).report()
    assert f"0::/{cgroup_parent}" in report["cgroup"]
    assert not (CGROUP2 / cgroup_parent / jail_id).exists()


def test_cgroup_v1(work: Path, cgroup_parent: str) -> None:
    require(Path("/sys/fs/cgroup/pids/cgroup.procs").exists(), "needs the cgroup v1 pids hierarchy")
    jail_id = _jail_id()
    report = _run(work, _exec_file(work), jail_id, "--parent-cgroup", cgroup_parent,
                  "--cgroup", "pids.max=64").report()
    assert any(re.fullmatch(rf"\d+:pids:/{cgroup_parent}/{jail_id}", line) for line in report["cgroup"])
    assert (Path("/sys/fs/cgroup/pids") / cgroup_parent / jail_id / "pids.max").read_text().strip() == "64"


# --- bad input ------------------------------------------------------------------------------------------


# case: (flags replacing the defaults, extra flags, what the message must say). "{work}" is the test's directory.
BAD_INPUT: dict[str, tuple[dict[str, str], list[str], str]] = {
    "id-underscore": ({"--id": "bad_id"}, [], "invalid char (_) at position 3"),
    "id-too-long": ({"--id": "a" * 65}, [], "invalid length (65)"),
    "missing-exec-file": ({"--exec-file": "{work}/bin/firecracker-missing"}, [], "firecracker-missing"),
    "exec-file-name": ({"--exec-file": "{work}/bin/vmm"}, [], 'must contain "firecracker"'),
    "missing-chroot-base": ({"--chroot-base-dir": "{work}/no-base"}, [], "--chroot-base-dir must exist"),
    "daemonize": ({}, ["--daemonize"], "--daemonize is not supported"),
    "new-pid-ns": ({}, ["--new-pid-ns"], "--new-pid-ns is not supported"),
    "unknown-resource-limit": ({}, ["--resource-limit", "cpu=1"], "Invalid resource argument: cpu"),
    "resource-limit-above-hard": ({}, ["--resource-limit", f"no-file={2**40}"], "above the current hard limit"),
    "cgroup-format": ({}, ["--cgroup", "pids.max"], "Invalid format for cgroups: pids.max"),
    "cgroup-v1-controller": ({}, ["--cgroup", "nosuch.max=1"], "Controller nosuch is unavailable"),
    "cgroup-v2-controller": ({}, ["--cgroup-version", "2", "--cgroup", "nosuch.max=1"],
                             "Controller nosuch is unavailable"),
    "parent-cgroup": ({}, ["--parent-cgroup", "../escape"], "Parent cgroup path is invalid"),
    "cgroup-version": ({}, ["--cgroup-version", "3"], "3 is an invalid cgroup version"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input(work: Path, case: str) -> None:
    overrides, flags, message = BAD_INPUT[case]
    exe = _exec_file(work)
    shutil.copy2(exe, work / "bin" / "vmm")
    options = {"--id": _jail_id(), "--exec-file": str(exe), "--uid": str(UID), "--gid": str(GID),
               "--chroot-base-dir": str(work / "base")}
    options.update({flag: value.format(work=work) for flag, value in overrides.items()})
    command = [str(JAILER), *(item for pair in options.items() for item in pair), *flags]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("jailer: error: "), proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    assert list((work / "base").iterdir()) == [], "bad input must be refused before anything is created"
    assert _mounts_under(work) == []


def test_usage_error_exits_2(work: Path) -> None:
    proc = subprocess.run([str(JAILER), "--exec-file", "/bin/true", "--uid", "1", "--gid", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--id" in proc.stderr


def test_failure_inside_the_jail_leaves_no_mount(work: Path) -> None:
    """exec fails after pivot_root (the interpreter is not in the jail): the mounts die with the namespace."""
    exe = _exec_file(work, "firecracker-broken", interpreter="/nonexistent/python3")
    proc = subprocess.run([str(JAILER), "--id", _jail_id(), "--exec-file", str(exe), "--uid", str(UID),
                           "--gid", str(GID), "--chroot-base-dir", str(work / "base")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "jailer: error: Failed to exec into Firecracker" in proc.stderr
    assert _mounts_under(work) == []


# --- fc-mock, jailed ------------------------------------------------------------------------------------


def test_fc_mock_keeps_its_capabilities_and_its_children_get_none(work: Path) -> None:
    """fc-mock's MMDS operations work with the two capabilities; after fc-mock's start clears the ambient set it
    keeps them, and a process it spawns (QEMU, in real use) has none and cannot do the same."""
    from pyroute2 import netns

    interpreter = os.path.realpath(sys.executable)
    exe = _exec_file(work, "firecracker-caps", CAPS_PROBE, interpreter=interpreter)
    name = f"fcvm-jailer-{secrets.token_hex(4)}"
    netns.create(name)
    try:
        report = _run(work, exe, _jail_id(), "--netns", f"/var/run/netns/{name}").report()
    finally:
        netns.remove(name)
    assert report["before"]["CapAmb"] == MMDS_MASK
    assert report["after"]["CapAmb"] == 0
    assert report["after"]["CapEff"] == MMDS_MASK
    child = report["child"]
    assert child["caps"]["CapEff"] == child["caps"]["CapPrm"] == child["caps"]["CapAmb"] == 0
    assert child["bound_low_port"] is False


def test_fc_mock_serves_its_api_from_the_jail(work: Path) -> None:
    require(FC_MOCK.is_file(), f"needs {FC_MOCK} (pip install -e .)")
    try:
        find_spec()
    except SpecNotFoundError:
        require(False, "needs the Firecracker API spec fc-mock validates against")
    exe = work / "bin" / "firecracker"  # a copy, as the jailer copies: a link would be resolved to its target
    shutil.copy2(FC_MOCK, exe)
    jail_id = _jail_id()
    sock = _jail_root(work, exe, jail_id) / "run" / "firecracker.socket"
    proc = subprocess.Popen([str(JAILER), "--id", jail_id, "--exec-file", str(exe), "--uid", str(UID),
                             "--gid", str(GID), "--chroot-base-dir", str(work / "base"),
                             "--", "--api-sock", "/run/firecracker.socket"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, f"fc-mock exited: {proc.stdout.read() if proc.stdout else ''}"
            assert time.monotonic() < deadline, "no API socket after 60 s"
            time.sleep(0.1)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(30)
            client.connect(str(sock))
            client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := client.recv(65536):
                response += chunk
        head, _, body = response.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200") and "X-Fcvm-Mock: 1" in head
        assert json.loads(body)["id"] == jail_id
        status = Path(f"/proc/{proc.pid}/status").read_text()
        sets = {k: int(v, 16) for k, _, v in (line.partition(":") for line in status.splitlines())
                if k.startswith("Cap")}
        assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, re.M)
        assert sets["CapEff"] == MMDS_MASK and sets["CapAmb"] == 0  # fc-mock cleared the ambient set
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert "Running Firecracker v" in output
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
