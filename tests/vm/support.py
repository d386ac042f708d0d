"""Helpers for the VM tier: run the fcvm CLI, read a VM's row, reach its published ports.

VMs are started through the `run_vm` fixture (tests/vm/conftest.py), which stops them whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

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
