"""The jailed Firecracker launch: the jailer's command line, paths as the jail sees them, finding the jailer,
and the run options that cannot work with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core.errors import FcvmError
from fcvm.vmm.base import Drive, MachineSpec
from fcvm.vmm.firecracker import models as m
from fcvm.vmm.firecracker.jail import Jail, find_jailer
from fcvm.vmm.firecracker.vm import FirecrackerVm


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Socket paths must fit in 108 bytes; pytest's tmp_path is too long for the jail layout."""
    path = Path(tempfile.mkdtemp(prefix="fj", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def make_jail(tmp_path: Path) -> Jail:
    return Jail(jailer=Path("/opt/fc/jailer"), exec_file=Path("/opt/fc/firecracker"), id="0a1b2c3d4e5f",
                uid=1_900_000_007, gid=1_900_000_007, base=tmp_path / "jail", netns=Path("/run/netns/fcvm-x"))


def jailed_spec(jail: Jail, tmp_path: Path) -> MachineSpec:
    root = jail.root
    return MachineSpec(name="web", workdir=tmp_path / "vm", kernel=root / "vmlinux", initrd=root / "initrd.img",
                       boot_args="console=ttyS0", vcpus=1, mem_mib=128,
                       drives=[Drive("rootfs", root / "rootfs.ext4", root=True),
                               Drive("image", root / "image.tar", read_only=True)],
                       tap="tap0", guest_mac="06:00:ac:10:00:02", vsock_uds=root / "v.sock")


def test_the_jail_layout_follows_the_jailer(short_tmp: Path) -> None:
    tmp_path = short_tmp
    jail = make_jail(tmp_path)
    assert jail.root == tmp_path / "jail/firecracker/0a1b2c3d4e5f/root"
    assert jail.api_socket == jail.root / "run/firecracker.socket"
    assert jail.inside(jail.root / "v.sock") == "/v.sock"
    with pytest.raises(FcvmError, match=r"/var/lib/fcvm/assets/vmlinux is outside the jail"):
        jail.inside(Path("/var/lib/fcvm/assets/vmlinux"))


def test_firecracker_is_launched_through_the_jailer(short_tmp: Path) -> None:
    tmp_path = short_tmp
    jail = make_jail(tmp_path)
    vm = FirecrackerVm(jailed_spec(jail, tmp_path), binary=jail.exec_file, mmds=None, jail=jail)
    assert vm.api_socket == jail.api_socket
    assert vm.argv() == [
        "/opt/fc/jailer", "--id", "0a1b2c3d4e5f", "--exec-file", "/opt/fc/firecracker",
        "--uid", "1900000007", "--gid", "1900000007", "--chroot-base-dir", str(tmp_path / "jail"),
        "--cgroup-version", "2", "--parent-cgroup", "fcvm/0a1b2c3d4e5f", "--netns", "/run/netns/fcvm-x",
        "--", "--api-sock", "/run/firecracker.socket", "--level", "Info",
    ]


def test_the_api_is_told_paths_inside_the_jail(short_tmp: Path) -> None:
    tmp_path = short_tmp
    jail = make_jail(tmp_path)
    vm = FirecrackerVm(jailed_spec(jail, tmp_path), binary=jail.exec_file, mmds={"plan": 1}, jail=jail)
    bodies = {path: body.body() if isinstance(body, m.Model) else body for _, path, body in vm.boot_requests()}
    assert bodies[m.BOOT_SOURCE]["kernel_image_path"] == "/vmlinux"
    assert bodies[m.BOOT_SOURCE]["initrd_path"] == "/initrd.img"
    assert bodies[m.drive_path("rootfs")]["path_on_host"] == "/rootfs.ext4"
    assert bodies[m.drive_path("image")]["path_on_host"] == "/image.tar"
    assert bodies[m.VSOCK]["uds_path"] == "/v.sock"


def test_a_file_left_outside_the_jail_is_refused_before_launch(short_tmp: Path) -> None:
    tmp_path = short_tmp
    jail = make_jail(tmp_path)
    spec = jailed_spec(jail, tmp_path)
    spec.kernel = tmp_path / "vmlinux"
    vm = FirecrackerVm(spec, binary=jail.exec_file, mmds=None, jail=jail)
    with pytest.raises(FcvmError, match="outside the jail"):
        vm.boot_requests()


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_finding_the_jailer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    firecracker = _executable(tmp_path / "release/firecracker")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("FCVM_JAILER_BIN", raising=False)
    with pytest.raises(FcvmError, match="no jailer binary found"):
        find_jailer(None, firecracker)
    beside = _executable(tmp_path / "release/jailer")
    assert find_jailer(None, firecracker) == beside
    chosen = _executable(tmp_path / "other/jailer")
    monkeypatch.setenv("FCVM_JAILER_BIN", str(chosen))
    assert find_jailer(None, firecracker) == chosen
    with pytest.raises(FcvmError, match=r"jailer '/nonexistent/jailer' \(from --jailer-bin\) does not exist"):
        find_jailer("/nonexistent/jailer", firecracker)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hypervisor", "qemu", "--jailer"], "--jailer applies to Firecracker only"),
        (["--jailer-bin", "/bin/true"], "--jailer-bin needs --jailer"),
        (["--hypervisor", "firecracker", "--network", "rootless", "--jailer"], "--jailer needs"),
        (["--hypervisor", "firecracker", "--network", "bridged", "--jailer"],
         "--jailer runs only a binary whose name contains 'firecracker', not 'true'"),
    ],
)
def test_options_the_jailer_cannot_work_with(args: list[str], message: str) -> None:
    fake_firecracker = {"FCVM_FIRECRACKER_BIN": "/bin/true"}
    result = subprocess.run([sys.executable, "-m", "fcvm", "podman", "run", *args, "localhost/x"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, **fake_firecracker})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
