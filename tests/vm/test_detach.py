"""`fcvm podman run -d`: the detached supervisor gets the parsed request, never a rewritten argv.

Before the fix, -d re-ran `fcvm` with argv filtered word by word: a `-d` meant for the container was dropped, a
bundled `-dp` detached twice, a `--name` in the container's command left the parent waiting for a name the child
never used, `-e` values sat in the child's /proc/PID/cmdline, and the log was `<data dir>/logs/<name>.log`.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fcvm.core import paths
from fcvm.core.wait import wait_until
from tests.vm.support import RunVm, fcvm, get, published_url, vm_row


def _cmdlines() -> list[bytes]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes())
            except OSError:
                continue
    return found


def test_the_containers_command_reaches_it_as_typed_and_rm_removes_the_logs(run_vm: RunVm) -> None:
    row = run_vm("-d", "--name", "web", "localhost/fcvm-busybox",
                 "sh", "-c", 'ls -d /; echo -d --name x; echo "$@"', "sh", "-d", "--name", "y")
    vm_id = str(row["id"])
    wait_until(lambda: vm_row("web")["status"] == "exited", 120, interval=0.5)
    assert vm_row("web")["exit_code"] == 0
    assert fcvm("logs", "web").stdout.splitlines() == ["/", "-d --name x", "-d --name y"]
    logs = paths.vm_logs_dir(vm_id)
    assert (logs / "supervisor.log").is_file()  # named by VM id, never by the user's name
    assert not (paths.data_dir() / "logs" / "web.log").exists()
    fcvm("rm", "web")
    assert not logs.exists()


def test_a_name_inside_the_command_and_env_values_stay_the_containers(run_vm: RunVm) -> None:
    secret = f"fcvm-secret-{secrets.token_hex(8)}"
    # No --name for the VM, but one in the container's command: the parent waits for the name it generated.
    row = run_vm("-d", "--boot-timeout", "120", "-e", f"FCVM_TEST_SECRET={secret}", "localhost/fcvm-busybox",
                 "sh", "-c", "exec sleep 600", "--name", "x")
    assert row["status"] == "running" and row["name"] != "x"
    assert fcvm("exec", str(row["id"]), "--", "sh", "-c", 'echo "$FCVM_TEST_SECRET"').stdout.strip() == secret
    leaks = [cmdline for cmdline in _cmdlines() if secret.encode() in cmdline]
    assert leaks == [], "an -e value is visible in /proc/PID/cmdline"


def test_a_bundled_dp_detaches_once_and_publishes(run_vm: RunVm, host_port: int) -> None:
    row = run_vm("-dp", f"{host_port}:80", "--name", "bundled", "localhost/fcvm-demo-httpd")
    assert row["status"] == "running" and row["name"] == "bundled"
    assert "fcvm demo page" in get(published_url("bundled", 80))
