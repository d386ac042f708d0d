"""Host state around real VMs: debug logs without env values, private logs that `fcvm rm` removes, and an
`fcvm ls` after a SIGKILLed owner that answers only once the VMM and slirp4netns are gone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from fcvm.core import paths
from tests.support import as_other_user, require_tool
from tests.vm.support import fcvm, hypervisor_env, vm_row

SECRET = "hunter2-xyz"


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()] if tasks.exists() else []


def _running(pid: int) -> bool:
    """Any thread of `pid` yet to exit (its leader may be a zombie while other threads still run)."""
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if (task / "stat").read_bytes().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    return True
    return False


def test_a_debug_run_logs_no_env_value_and_only_its_owner_reads_its_logs(guest_assets: None) -> None:
    """Firecracker (fc-mock) carries the plan, env and all, in MMDS: the API requests are logged at debug level."""
    env = {**hypervisor_env("firecracker"), "FCVM_LOG": "debug"}
    result = fcvm("podman", "run", "--hypervisor", "firecracker", "--name", "secretive", "-e", f"SECRET={SECRET}",
                  "localhost/fcvm-busybox", "sh", "-c", 'echo "$SECRET" | rev', env=env)
    assert result.stdout.splitlines() == [SECRET[::-1]]  # the value reached the container
    assert "PUT /mmds" in result.stderr  # the requests were logged
    assert SECRET not in result.stdout + result.stderr
    logs = paths.vm_logs_dir(str(vm_row("secretive")["id"]))
    assert sorted(p.name for p in logs.iterdir()) == ["console.log", "container.log"]
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    for log_file in logs.iterdir():
        assert SECRET not in log_file.read_text(errors="replace"), log_file.name
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600, log_file.name
        assert as_other_user(lambda f=log_file: f.read_bytes()) == "PermissionError: Permission denied"

    fcvm("rm", "secretive")
    assert not logs.exists()


def test_ls_right_after_kill_9_of_a_rootless_run_returns_once_qemu_and_slirp4netns_are_gone(
        guest_assets: None) -> None:
    require_tool("slirp4netns", "unshare", "nsenter")
    owner = subprocess.Popen([sys.executable, "-m", "fcvm", "podman", "run", "--network", "rootless", "--name",
                              "killed", "localhost/fcvm-busybox", "sleep", "600"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(r["name"] == "killed" and r["status"] == "running"
                      for r in json.loads(fcvm("ls", "--json").stdout)):
            assert owner.poll() is None, owner.communicate()[1]
            assert time.monotonic() < deadline, "the VM did not start"
            time.sleep(0.5)
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _children(owner.pid)}
        vm_processes = [pid for pid, cmd in commands.items() if b"qemu-system" in cmd or b"slirp4netns" in cmd]
        assert len(vm_processes) == 2, commands

        owner.kill()
        owner.wait()
        listing = fcvm("ls", "--json")

        assert [pid for pid in vm_processes if _running(pid)] == []
        assert json.loads(listing.stdout) == []
        assert vm_row("killed")["status"] == "exited"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        fcvm("ls")
