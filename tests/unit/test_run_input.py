"""Bad input to `fcvm podman run` gets a one-line error naming the fix, and nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcvm.core.proc import ProcessRef
from fcvm.state import Store


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fcvm", "podman", "run", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--network", "tcp", "localhost/x"], "argument --network: invalid choice: 'tcp'"),
        (["Bad Image!"], "invalid image name 'Bad Image!'"),
        (["--hypervisor", "xen", "localhost/x"], "argument --hypervisor: invalid choice: 'xen'"),
        (["-p", "99999:80", "localhost/x"], "99999"),
        (["-p", "80", "localhost/x"], "-p"),
        (["--map", "/nonexistent-dir:/data", "localhost/x"], "/nonexistent-dir is not a directory"),
        (["--map", "/tmp:data", "localhost/x"], "the guest path must be absolute"),
        (["-e", "=x", "localhost/x"], "must be KEY=VALUE"),
        (["--mem", "16", "localhost/x"], "--mem at least 128"),
    ],
)
def test_bad_input_is_a_one_line_error(args: list[str], message: str) -> None:
    result = run("--network", "rootless", *args) if "--network" not in args else run(*args)
    assert result.returncode in (1, 2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert json.loads(subprocess.run([sys.executable, "-m", "fcvm", "ls", "-a", "--json"], capture_output=True,
                                     text=True, check=True).stdout) == []


def test_a_name_held_by_a_live_vm_is_refused_and_nothing_is_left(isolated_data_dir: Path) -> None:
    store = Store()
    held = store.create_vm("taken", process=ProcessRef.self())
    store.update_vm(held.id, status="running")
    result = run("--network", "rootless", "--name", "taken", "localhost/x")
    assert result.returncode == 1
    assert "the name 'taken' is already used by a running VM" in result.stderr
    assert [vm.id for vm in store.list_vms(include_exited=True)] == [held.id]
    assert not (isolated_data_dir / "vms").exists() or list((isolated_data_dir / "vms").iterdir()) == []


def test_missing_guest_assets_name_the_setup_command(tmp_path: Path) -> None:
    result = run("--network", "rootless", "--name", "noassets", "localhost/x",
                 env={"FCVM_ASSETS_DIR": str(tmp_path / "empty")})
    assert result.returncode == 1
    assert "run `fcvm setup" in result.stderr
    assert json.loads(subprocess.run([sys.executable, "-m", "fcvm", "ls", "-a", "--json"], capture_output=True,
                                     text=True, check=True).stdout) == []


def test_no_usable_hypervisor_names_the_package_to_install(tmp_path: Path) -> None:
    """No KVM-capable Firecracker and no QEMU on PATH: a one-line error with the fix, nothing created."""
    result = run("--network", "rootless", "localhost/x", env={"PATH": str(tmp_path), "FCVM_FIRECRACKER_BIN": ""})
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: qemu-system-x86_64 is not installed "
                                     "(apt-get install qemu-system-x86)")


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.parametrize("name", ["../../x", "x/../../y", "web\nfake-row", "web\x1b[31mred", ".hidden", "_x", "a b",
                                  "x" * 65])
@pytest.mark.parametrize("detach", [True, False])
def test_a_bad_name_is_a_one_line_usage_error_and_creates_nothing(name: str, detach: bool, tmp_path: Path) -> None:
    """podman's rule, [a-zA-Z0-9][a-zA-Z0-9_.-]*: a name ends up in paths, logs and terminals."""
    data_dir = tmp_path / "a" / "b" / "data"
    before = _tree(tmp_path)
    result = run("--network", "rootless", *(["-d"] if detach else []), "--name", name, "localhost/fcvm-busybox",
                 "true", env={"FCVM_DATA_DIR": str(data_dir)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: invalid VM name {name!r}"), result.stderr
    assert "\x1b" not in result.stderr and result.stdout == ""
    assert _tree(tmp_path) == before  # no log file (inside or outside the data dir), no state, no VM
