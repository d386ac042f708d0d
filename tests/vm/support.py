"""Helpers for the VM tier: run the fcvm CLI, read a VM's row, reach its published ports.

VMs are started through the `run_vm` fixture (tests/vm/conftest.py), which stops them whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fcvm.core.wait import wait_until
from tests.support import require

HYPERVISORS = ["qemu", "firecracker"]
# The `run_vm` fixture: run_vm(*podman_run_args, env=None) -> the VM's row
RunVm = Callable[..., dict[str, object]]
SPEC = Path(__file__).resolve().parents[3] / "shared" / "firecracker" / "firecracker-v1.16.1.yaml"


def hypervisor_env(hypervisor: str) -> dict[str, str]:
    """Firecracker here is fc-mock: the official API, validated against the official spec, booting via QEMU."""
    if hypervisor == "qemu":
        return dict(os.environ)
    require(SPEC.is_file(), f"the Firecracker API spec is missing at {SPEC}")
    mock = shutil.which("fcvm-fc-mock")
    require(mock is not None, "fcvm-fc-mock is not installed (pip install -e .)")
    return {**os.environ, "FCVM_FIRECRACKER_BIN": str(mock), "FCVM_FC_SPEC": str(SPEC)}


def fcvm(*args: str, timeout: float = 300, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "fcvm", *args], capture_output=True, text=True,
                            timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"fcvm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def vm_row(name: str) -> dict[str, object]:
    rows = json.loads(fcvm("ls", "-a", "--json").stdout)
    return next(r for r in rows if r["name"] == name)


def crash_owner_then_list(row: dict[str, object]) -> None:
    """SIGKILL the fcvm process that owns the VM of `row`, as a crash would; the next `fcvm ls` cleans up after
    it: the VM is listed no more, and shows as exited."""
    from fcvm.core.proc import ProcessRef

    pid, name = row["pid"], str(row["name"])
    assert isinstance(pid, int)
    owner = ProcessRef.of(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not owner.alive(), 30)
    assert name not in fcvm("ls").stdout
    assert vm_row(name)["status"] == "exited"


def published_url(name: str, guest_port: int) -> str:
    row = vm_row(name)
    network = row["network"]
    assert isinstance(network, dict)
    for ip, port, mapping in network["published"]:  # mapping is the -p text, e.g. "8080:80"
        if mapping.split(":")[-1].split("/")[0] == str(guest_port):
            return f"http://{ip}:{port}/"
    raise AssertionError(f"port {guest_port} is not published: {network}")


def get(url: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


PAGE = "fcvm demo page"


def page(port: int, timeout: float = 60) -> str:
    return get(f"http://127.0.0.1:{port}/", timeout)


def rows() -> list[dict[str, object]]:
    return list(json.loads(fcvm("ls", "-a", "--json").stdout))


def live_names() -> set[str]:
    return {str(r["name"]) for r in rows() if r["status"] != "exited"}


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.stderr


class Server:
    """`fcvm snapshot serve TAG` in the background, as a user starts it with `&`."""

    def __init__(self, tag: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "fcvm", "snapshot", "serve", tag],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert wait_until(lambda: any(s["pid"] == self.pid and s["status"] == "running"
                                      for s in self.servers()), 60), "the memory server did not start"

    @property
    def pid(self) -> int:
        return self.process.pid

    @staticmethod
    def servers() -> list[dict[str, object]]:
        data = json.loads(fcvm("snapshot", "ls", "--json").stdout)
        return [s for snap in data["snapshots"] for s in snap["servers"]] + list(data["servers"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
