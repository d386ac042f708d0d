"""The trunk, end to end: a container in a microVM, its published port, exec, logs, stop, nothing left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fcvm.core.wait import wait_until
from tests.hoststate import HostState
from tests.vm.support import (
    HYPERVISORS,
    RunVm,
    crash_owner_then_list,
    fcvm,
    get,
    hypervisor_env,
    published_url,
    vm_row,
)

NETWORKS = ["bridged", "rootless"]


@pytest.mark.parametrize("hypervisor", HYPERVISORS)
@pytest.mark.parametrize("network", NETWORKS)
def test_detached_httpd_serves_its_page_runs_exec_and_leaves_nothing(
    run_vm: RunVm, host_port: int, network: str, hypervisor: str
) -> None:
    env = hypervisor_env(hypervisor)
    before = HostState.capture()
    row = run_vm("-d", "--name", "demo", "--network", network, "--hypervisor", hypervisor, "-p", f"{host_port}:80",
                 "localhost/fcvm-demo-httpd", env=env)
    assert row["status"] == "running" and row["health"] == "healthy"
    assert row["hypervisor"] == ("qemu" if hypervisor == "qemu" else "firecracker (fc-mock)")
    assert "fcvm demo page" in get(published_url("demo", 80))
    if network == "bridged":
        assert "fcvm demo page" in get(f"http://127.0.0.1:{host_port}/")
    assert fcvm("exec", "demo", "--", "cat", "/etc/hostname").stdout.strip() == "demo"
    exec_code = fcvm("exec", "demo", "--", "sh", "-c", "echo oops >&2; exit 7", check=False)
    assert exec_code.returncode == 7 and exec_code.stderr.strip() == "oops"
    missing = fcvm("exec", "demo", "--", "no-such-command", check=False)
    assert missing.returncode == 127 and "no-such-command" in missing.stderr  # what podman exec answers
    piped = subprocess.run([sys.executable, "-m", "fcvm", "exec", "-i", "demo", "--", "sh", "-c", "cat; exit 255"],
                           input="from the host\n", capture_output=True, text=True, timeout=120, env=env)
    assert (piped.returncode, piped.stdout, piped.stderr) == (255, "from the host\n", "")
    assert "Linux" in fcvm("exec", "demo", "--vm", "--", "uname", "-s").stdout
    # -t under a real terminal: the command sees a pty of the caller's size.
    tty = subprocess.run(["script", "-qec", f"stty rows 33 cols 101; {sys.executable} -m fcvm exec -it demo "
                          "-- sh -c 'tty; stty size; exit 5'", "/dev/null"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert tty.returncode == 5, tty.stdout + tty.stderr
    assert "/dev/pts/" in tty.stdout and "33 101" in tty.stdout
    assert "demo" in fcvm("ls").stdout
    assert "fc-agent" in fcvm("logs", "--console", "demo").stdout
    fcvm("stop", "demo")
    row = vm_row("demo")
    assert row["status"] == "exited" and row["exit_code"] == 137  # busybox httpd as PID 1 ignores SIGTERM
    assert HostState.capture().diff(before) == {}


def test_foreground_run_streams_output_and_returns_the_container_exit_code(guest_assets: None) -> None:
    result = fcvm("podman", "run", "--name", "fg", "-e", "GREETING=hi there", "localhost/fcvm-busybox",
                  "sh", "-c", "echo $GREETING; echo to-stderr >&2; exit 3", check=False)
    assert result.returncode == 3, result.stderr
    assert "hi there" in result.stdout.splitlines()
    assert "to-stderr" in result.stderr
    assert vm_row("fg")["exit_code"] == 3
    assert "hi there" in fcvm("logs", "fg").stdout
    assert "hi there" not in json.dumps(vm_row("fg")), "environment values (secrets) must not be stored"
    fcvm("rm", "fg")
    assert all(r["name"] != "fg" for r in json.loads(fcvm("ls", "-a", "--json").stdout))


def test_rm_flag_removes_the_record_on_exit(guest_assets: None) -> None:
    assert fcvm("podman", "run", "--rm", "--name", "gone", "localhost/fcvm-busybox", "true").returncode == 0
    assert all(r["name"] != "gone" for r in json.loads(fcvm("ls", "-a", "--json").stdout))


def test_sigint_in_the_foreground_stops_the_vm_and_cleans_up(guest_assets: None, host_port: int) -> None:
    before = HostState.capture()
    child = subprocess.Popen([sys.executable, "-m", "fcvm", "podman", "run", "--name", "ctrlc",
                              "-p", f"{host_port}:80", "localhost/fcvm-demo-httpd"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        get(f"http://127.0.0.1:{host_port}/", timeout=120)
    finally:
        # A terminal's Ctrl-C signals the whole foreground process group, not just fcvm.
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=60)
    # Ctrl-C stops the container like `podman stop`; busybox httpd (PID 1) ignores SIGTERM, so it is killed
    # after the timeout, and like podman we return the container's exit code.
    assert child.returncode == 137
    assert vm_row("ctrlc")["status"] == "exited" and vm_row("ctrlc")["exit_code"] == 137
    assert HostState.capture().diff(before) == {}


def test_sigkill_of_the_owner_is_cleaned_up_by_the_next_ls(run_vm: RunVm, host_port: int) -> None:
    before = HostState.capture()
    crash_owner_then_list(run_vm("-d", "--name", "doomed", "-p", f"{host_port}:80", "localhost/fcvm-demo-httpd"))
    assert HostState.capture().diff(before) == {}


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()] if tasks.exists() else []


def test_a_vmm_killed_under_the_supervisor_takes_its_guest_along(run_vm: RunVm) -> None:
    """fc-mock boots its guest in a QEMU child; SIGKILL fc-mock, and no QEMU may outlive it."""
    env = hypervisor_env("firecracker")
    before = HostState.capture()
    supervisor = run_vm("-d", "--name", "vmmkill", "--hypervisor", "firecracker", "localhost/fcvm-demo-httpd",
                        env=env)["pid"]
    assert isinstance(supervisor, int)
    [vmm] = [c for c in _children(supervisor) if b"fcvm-fc-mock" in Path(f"/proc/{c}/cmdline").read_bytes()]
    [qemu] = [c for c in _children(vmm) if b"qemu-system" in Path(f"/proc/{c}/cmdline").read_bytes()]
    os.kill(vmm, signal.SIGKILL)
    wait_until(lambda: vm_row("vmmkill")["status"] == "exited", 60, interval=0.2)
    assert vm_row("vmmkill")["status"] == "exited"
    assert not Path(f"/proc/{qemu}").exists() or b") Z" in Path(f"/proc/{qemu}/stat").read_bytes()
    assert HostState.capture().diff(before) == {}


def test_a_guest_that_does_not_start_in_time_fails_clearly_and_leaves_nothing(guest_assets: None) -> None:
    before = HostState.capture()
    result = fcvm("podman", "run", "--name", "slow", "--boot-timeout", "1", "localhost/fcvm-busybox", "true",
                  check=False)
    assert result.returncode == 1
    assert "the container did not start within 1 s (--boot-timeout)" in result.stderr
    assert vm_row("slow")["status"] == "exited"
    assert HostState.capture().diff(before) == {}


def test_health_check_url_decides_health(run_vm: RunVm, host_port: int) -> None:
    assert run_vm("-d", "--name", "hc", "-p", f"{host_port}:80", "--health-check", "http://localhost/index.html",
                  "localhost/fcvm-demo-httpd")["health"] == "healthy"
    fcvm("stop", "hc")
    assert run_vm("-d", "--name", "hc404", "-p", f"{host_port}:80", "--health-check", "http://localhost/missing.html",
                  "localhost/fcvm-demo-httpd")["health"] == "unhealthy"
    assert "unhealthy" in fcvm("ls").stdout


def test_the_images_own_healthcheck_drives_health(run_vm: RunVm, tmp_path: Path) -> None:
    """Without --health-check, an image HEALTHCHECK decides health (podman build keeps it in docker format)."""
    (tmp_path / "Containerfile").write_text(
        "FROM localhost/fcvm-demo-httpd\nHEALTHCHECK --interval=2s --timeout=2s CMD test -f /tmp/ready\n")
    subprocess.run(["podman", "build", "--format", "docker", "-t", "localhost/fcvm-test-healthcheck",
                    str(tmp_path)], check=True, capture_output=True, timeout=300)
    assert run_vm("-d", "--name", "hcimg", "localhost/fcvm-test-healthcheck")["health"] == "unhealthy"
    fcvm("exec", "hcimg", "--", "touch", "/tmp/ready")
    wait_until(lambda: vm_row("hcimg")["health"] == "healthy", 30, interval=0.5)
    assert vm_row("hcimg")["health"] == "healthy"
