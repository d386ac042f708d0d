"""The whole product as an unprivileged user: `fcvm podman run --network rootless` with no root and no sudo.

Root (this test) only prepares what an administrator would: a user (`useradd -m`, which also gives it
/etc/subuid and /etc/subgid ranges for rootless podman) and the shared guest assets (the `guest_assets`
fixture, in `FCVM_ASSETS_DIR`, readable by everyone). Everything else runs as that user:

- its interpreter: a venv of Debian's /usr/bin/python3 in the user's home with a *copy* of this checkout
  installed into it (non-editable), because root's Python and the checkout may sit under a 0700 /root. The
  venv is kept between runs (first run: the dependencies come from PyPI, so pip needs network access once);
  the copy is reinstalled every run, so the user runs exactly these sources (and the initramfs named by
  them, which root built);
- its container image: `fcvm setup demo-image` into the user's own (rootless) podman storage;
- the VM: QEMU inside the rootless user+net namespace, the per-VM disk in the user's own data dir (a sparse
  copy when that is not btrfs), the image disk exported by the user's podman.

System-wide prerequisites (scripts/setup-host.sh and .ci/run provide them): python3-venv, uidmap,
slirp4netns, qemu-system-x86, podman, and /dev/net/tun at mode 0666 (as udev sets it on a normal host).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from fcvm.core import paths
from tests.hoststate import HostState
from tests.support import require, require_root, require_tool

USER = "fcvm-test"
REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True, capture_output=True)
        return pwd.getpwnam(USER)


def _has_subids(name: str) -> bool:
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return False
        if not any(line.split(":", 1)[0] == name for line in lines):
            return False
    return True


def _readable_by_others(path: Path) -> bool:
    """Every directory on the way is searchable by others, and `path` itself readable."""
    for part in [*reversed(path.parents), path]:
        mode = part.stat().st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


def _as_user(user: pwd.struct_passwd, env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    def drop() -> None:
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    def run(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=env, preexec_fn=drop, cwd=user.pw_dir, capture_output=True,
                              text=True, timeout=timeout, check=False)

    return run


def _chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    os.chown(root, user.pw_uid, user.pw_gid)
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(base, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def _prepare_interpreter(user: pwd.struct_passwd, run: Callable[..., subprocess.CompletedProcess[str]]) -> Path:
    """~/fcvm-venv with a fresh copy of this checkout installed (see the module docstring)."""
    home = Path(user.pw_dir)
    venv, source = home / "fcvm-venv", home / "fcvm-src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    _chown_tree(source, user)  # the build writes egg-info into the tree
    pip = str(venv / "bin" / "pip")
    if not (venv / "bin" / "fcvm").exists():
        created = run(SYSTEM_PYTHON, "-m", "venv", str(venv))
        require(created.returncode == 0, f"{SYSTEM_PYTHON} -m venv failed (python3-venv?): {created.stderr[-500:]}")
        deps = run(pip, "install", "-q", str(source), timeout=600)
        require(deps.returncode == 0, f"pip could not install fcvm's dependencies for {USER}: {deps.stderr[-800:]}")
    installed = run(pip, "install", "-q", "--no-deps", "--force-reinstall", str(source))
    assert installed.returncode == 0, installed.stderr
    return venv


def test_an_unprivileged_user_runs_a_container_in_a_rootless_vm(guest_assets: None) -> None:
    require_root()  # to create the user; everything that boots runs as that user
    require_tool("useradd", "podman", "qemu-system-x86_64", "slirp4netns", "unshare", "nsenter", "newuidmap")
    require(os.access(SYSTEM_PYTHON, os.X_OK), f"needs Debian's {SYSTEM_PYTHON}")
    tun = os.stat("/dev/net/tun").st_mode
    require(tun & 0o006 == 0o006, "/dev/net/tun must be usable by every user (mode 0666, as udev sets it)")
    assets = paths.assets_dir()
    require(_readable_by_others(assets), f"the shared guest assets {assets} must be readable by other users")

    user = _ensure_user()
    require(_has_subids(USER), f"{USER} needs /etc/subuid and /etc/subgid ranges for rootless podman")
    scratch = Path(tempfile.mkdtemp(prefix="fcvm-rl-", dir=user.pw_dir))
    os.chown(scratch, user.pw_uid, user.pw_gid)
    venv = Path(user.pw_dir) / "fcvm-venv"
    env = {
        "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name, "LANG": "C.UTF-8",
        "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        # The default data dir of a user ($XDG_DATA_HOME/fcvm), fresh for this run; the assets are root's.
        "XDG_DATA_HOME": str(scratch / "share"),
        paths.ASSETS_DIR_ENV: str(assets),
    }
    run = _as_user(user, env)
    try:
        _prepare_interpreter(user, run)
        fcvm = str(venv / "bin" / "fcvm")
        image = run(fcvm, "setup", "demo-image")
        assert image.returncode == 0, image.stderr
        assert "localhost/fcvm-busybox" in image.stdout.split()

        before = HostState.capture()
        result = run(fcvm, "podman", "run", "--rm", "--network", "rootless", "--name", "rl-user",
                     "localhost/fcvm-busybox", "sh", "-c", "echo hi-from-user; id -u")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["hi-from-user", "0"], result.stderr  # root in the container
        listed = run(fcvm, "ls", "-a", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        assert HostState.capture().diff(before) == {}
        # Nothing of the VM is left in the user's data dir either (the exported image disk is a cache).
        data = scratch / "share" / "fcvm"
        assert list((data / "vms").iterdir()) == [] and list((data / "logs").iterdir()) == []
    finally:
        leftovers = run(str(venv / "bin" / "fcvm"), "gc") if (venv / "bin" / "fcvm").exists() else None
        if leftovers is not None and leftovers.returncode != 0:
            print(f"fcvm gc as {USER}: {leftovers.stderr}")
        shutil.rmtree(scratch, ignore_errors=True)
