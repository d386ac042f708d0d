"""`--jailer`: Firecracker (here fc-mock, jailed by fcvm-jailer-mock) chrooted, as its own uid, in its own cgroup
and the VM's network namespace; the trunk still works through it, and nothing is left afterwards."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from fcvm.core import paths
from fcvm.state import Store
from fcvm.vmm.firecracker.jail import JAIL_UID_BASE, JAIL_UID_COUNT, cgroup2_mount
from tests.hoststate import HostState
from tests.support import require
from tests.vm.support import RunVm, crash_owner_then_list, fcvm, get, hypervisor_env, published_url, vm_row


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def jailed_env(tmp_path: Path) -> dict[str, str]:
    """fc-mock as the Firecracker binary and the stand-in jailer around it."""
    scripts = Path(sys.executable).parent  # pip's entry scripts (PATH may hold wrappers that cannot run jailed)
    jailer, mock = scripts / "fcvm-jailer-mock", scripts / "fcvm-fc-mock"
    require(jailer.is_file() and mock.is_file(), f"fcvm-jailer-mock and fcvm-fc-mock are not in {scripts}")
    require(cgroup2_mount() is not None, "--jailer needs a cgroup v2 hierarchy")
    firecracker = tmp_path / "bin" / "firecracker"  # the jailer runs only binaries of that name
    firecracker.parent.mkdir()
    shutil.copy(mock, firecracker)
    return {**hypervisor_env("firecracker"), "FCVM_FIRECRACKER_BIN": str(firecracker), "FCVM_JAILER_BIN": str(jailer)}


def assert_jail_gone(vm_id: str) -> None:
    assert vm_id and not (paths.data_dir() / "jail" / "firecracker" / vm_id).exists()
    mount = cgroup2_mount()
    assert mount is not None and not (mount / "fcvm" / vm_id).exists()


def test_jailed_firecracker_runs_the_trunk_and_leaves_nothing(run_vm: RunVm, host_port: int, tmp_path: Path,
                                                               jailed_env: dict[str, str]) -> None:
    env = jailed_env
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("served from the host\n")
    before = HostState.capture()
    row = run_vm("-d", "--name", "jailed", "--hypervisor", "firecracker", "--jailer", "-p", f"{host_port}:80",
                 "--map", f"{site}:/www", "localhost/fcvm-demo-httpd", env=env)
    vm_id = str(row["id"])
    assert row["status"] == "running" and row["hypervisor"] == "firecracker (fc-mock)"
    url = published_url("jailed", 80)
    assert get(url) == "served from the host\n"  # the demo httpd serves /www: the map, through the jail
    assert fcvm("exec", "jailed", "--", "cat", "/www/index.html").stdout == "served from the host\n"
    fcvm("exec", "jailed", "--", "sh", "-c", "echo from-guest > /www/out.txt")
    assert (site / "out.txt").read_text() == "from-guest\n"

    jail_root = paths.data_dir() / "jail" / "firecracker" / vm_id / "root"
    inspected = json.loads(fcvm("inspect", "jailed").stdout)[0]["config"]["jail"]
    assert inspected["root"] == str(jail_root)
    root_id = (jail_root.stat().st_dev, jail_root.stat().st_ino)
    [vmm] = [pid for pid in _processes_with(f"--id\0{vm_id}\0")
             if (lambda st: (st.st_dev, st.st_ino))(os.stat(f"/proc/{pid}/root")) == root_id]
    uid = int(_status(vmm)["Uid"].split()[0])
    assert uid == inspected["uid"]
    assert JAIL_UID_BASE <= uid < JAIL_UID_BASE + JAIL_UID_COUNT
    assert _status(vmm)["Gid"].split()[0] == str(uid)
    cgroup = Path(f"/proc/{vmm}/cgroup").read_text().splitlines()
    assert f"0::/fcvm/{vm_id}" in cgroup
    # QEMU (fc-mock's guest) runs as the jail uid without any capability: it attached to the TAP as its owner.
    [qemu] = [pid for pid in _processes_with("qemu-system") if _status(pid)["PPid"] == str(vmm)]
    assert _status(qemu)["Uid"].split()[0] == str(uid)
    assert int(_status(qemu)["CapEff"], 16) == 0
    fcvm("stop", "jailed")
    assert vm_row("jailed")["status"] == "exited"
    assert HostState.capture().diff(before) == {}
    assert_jail_gone(vm_id)
    assert Store().allocations(vm_id) == {}  # the jail uid, the subnet and the ports are free again


def test_a_killed_owner_of_a_jailed_vm_is_cleaned_up_by_the_next_ls(run_vm: RunVm,
                                                                    jailed_env: dict[str, str]) -> None:
    before = HostState.capture()
    row = run_vm("-d", "--name", "jailkill", "--hypervisor", "firecracker", "--jailer", "localhost/fcvm-demo-httpd",
                 env=jailed_env)
    vm_id = str(row["id"])
    crash_owner_then_list(row)
    assert not _processes_with(f"--id\0{vm_id}\0"), "the jailed VMM outlived its owner's cleanup"
    assert HostState.capture().diff(before) == {}
    assert_jail_gone(vm_id)
    assert Store().allocations(vm_id) == {}  # the jail uid, the subnet and the ports are free again
