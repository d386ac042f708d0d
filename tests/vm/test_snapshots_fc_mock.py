"""Snapshots and clones through the Firecracker API (fc-mock, booting for real via QEMU): a running httpd VM is
snapshotted, then cloned twice, memory from the file and from the UFFD page server; each clone serves the page
on its own port, runs exec, keeps its disk writes to itself, and the source keeps serving; nothing is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.hoststate import HostState
from tests.support import require
from tests.vm.conftest import free_port
from tests.vm.support import SPEC, fcvm, get, published_url, vm_row

SRC = Path(__file__).resolve().parents[2] / "src"
PAGE = "fcvm demo page"


def fc_mock_env() -> dict[str, str]:
    """fc-mock as Firecracker, from this checkout: the script beside this Python, with this `src` first."""
    mock = Path(sys.executable).parent / "fcvm-fc-mock"
    require(mock.is_file(), f"fcvm-fc-mock is not installed beside {sys.executable} (pip install -e .)")
    require(SPEC.is_file(), f"the Firecracker API spec is missing at {SPEC}")
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "FCVM_FIRECRACKER_BIN": str(mock), "FCVM_FC_SPEC": str(SPEC), "PYTHONPATH": path}


def snapshot_ls(env: dict[str, str]) -> dict[str, Any]:
    return dict(json.loads(fcvm("snapshot", "ls", "--json", env=env).stdout))


def wait_for_server(env: dict[str, str], pid: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        servers = [s for snap in snapshot_ls(env)["snapshots"] for s in snap["servers"] if s["pid"] == pid]
        if servers and servers[0]["status"] == "running" and Path(servers[0]["socket"]).is_socket():
            return servers[0]
        assert time.monotonic() < deadline, f"the memory server {pid} did not start"
        time.sleep(0.2)


def served_faults(env: dict[str, str], pid: int) -> int:
    """Pages the server has copied into its clients (its metrics are published about every second)."""
    deadline = time.monotonic() + 30
    while True:
        server = wait_for_server(env, pid)
        faults = sum(c["faults"] for c in server["clients"])
        if faults or time.monotonic() > deadline:
            return int(faults)
        time.sleep(0.5)


def test_file_and_uffd_clones_of_an_fc_mock_vm_serve_exec_and_leave_nothing(guest_assets: None) -> None:
    env = fc_mock_env()
    source_port, file_port, uffd_port = free_port(), free_port(), free_port()
    before = HostState.capture()
    fcvm("podman", "run", "-d", "--name", "web", "--hypervisor", "firecracker", "-p", f"{source_port}:80",
         "localhost/fcvm-demo-httpd", env=env)
    server: subprocess.Popen[bytes] | None = None
    try:
        assert vm_row("web")["hypervisor"] == "firecracker (fc-mock)"
        assert PAGE in get(published_url("web", 80))
        assert fcvm("snapshot", "create", "web", "--tag", "web-v1", env=env).stdout.strip() == "web-v1"
        assert PAGE in get(published_url("web", 80))  # resumed after the snapshot

        fcvm("snapshot", "run", "--snapshot", "web-v1", "--name", "cfile", "-p", f"{file_port}:80", "-d", env=env)
        server = subprocess.Popen([sys.executable, "-m", "fcvm", "snapshot", "serve", "web-v1"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_server(env, server.pid)
        fcvm("snapshot", "run", "--pid", str(server.pid), "--name", "cuffd", "-p", f"{uffd_port}:80", "-d",
             env=env)

        for clone in ("cfile", "cuffd"):
            row = vm_row(clone)
            assert row["status"] == "running" and row["hypervisor"] == "firecracker (fc-mock)", row
            assert PAGE in get(published_url(clone, 80))
            assert fcvm("exec", clone, "--", "sh", "-c", "echo $((6 * 7))", env=env).stdout.strip() == "42"
        assert served_faults(env, server.pid) > 0  # the Uffd clone's memory came from the page server

        # Each clone runs on its own reflink of the source's disk: a write stays where it was made.
        fcvm("exec", "cfile", "--", "sh", "-c", "echo cfile > /written-by-a-clone", env=env)
        assert fcvm("exec", "cfile", "--", "cat", "/written-by-a-clone", env=env).stdout.strip() == "cfile"
        for other in ("cuffd", "web"):
            assert fcvm("exec", other, "--", "test", "-e", "/written-by-a-clone", env=env, check=False).returncode == 1

        assert PAGE in get(published_url("web", 80))  # the source served throughout
    finally:
        if server is not None:
            server.terminate()  # stops its clone first
            server.wait(timeout=120)
        for name in ("cuffd", "cfile", "web"):
            fcvm("stop", name, env=env, check=False)
        rows = json.loads(fcvm("ls", "-a", "--json", env=env).stdout)
    assert {r["name"]: r["status"] for r in rows if r["name"] in ("web", "cfile", "cuffd")} == {
        "web": "exited", "cfile": "exited", "cuffd": "exited"}
    assert HostState.capture().diff(before) == {}
