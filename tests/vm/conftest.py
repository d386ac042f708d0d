from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator

import pytest

from tests.support import require
from tests.vm.support import RunVm, fcvm


@pytest.fixture(scope="session")
def guest_assets() -> None:
    """Build (or find, by content hash) the kernel, initramfs, rootfs and demo images, once per session."""
    require(os.geteuid() == 0, "booting guests needs root")
    require(shutil.which("qemu-system-x86_64") is not None, "needs qemu-system-x86_64")
    require(shutil.which("podman") is not None, "needs podman to build the demo images")
    from fcvm.guest import build_demo_images, ensure_kernel, ensure_rootfs

    kernel = ensure_kernel(progress=False)
    ensure_rootfs(kernel, progress=False)
    build_demo_images()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def host_port() -> Iterator[int]:
    yield free_port()


@pytest.fixture
def run_vm(guest_assets: None) -> Iterator[RunVm]:
    """`run_vm(*podman_run_args, env=None)`: `fcvm podman run ARGS` (with -d, or a bundle like -dp), returning the
    row of the VM whose id it printed.

    When the test ends, passed or failed, every VM still live in its data dir is stopped (a test that asserts on
    what stopping leaves behind stops its VM itself; stopping an exited VM again is a no-op)."""

    def run(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
        vm_id = fcvm("podman", "run", *args, env=env).stdout.split()[-1]
        return next(row for row in json.loads(fcvm("ls", "-a", "--json").stdout) if row["id"] == vm_id)

    yield run
    for row in json.loads(fcvm("ls", "--json").stdout):
        fcvm("stop", str(row["id"]), check=False)
