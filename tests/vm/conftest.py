from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator

import pytest

from tests.support import require
from tests.vm.support import RunVm, fcvm, vm_row


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
    """`run_vm(name, *podman_run_args, env=None)`: `fcvm podman run -d --name NAME ...`, returning the VM's row.

    Every VM started this way is stopped when the test ends, passed or failed (a test that asserts on what
    stopping leaves behind stops it itself; stopping an exited VM again is a no-op)."""
    started: list[tuple[str, dict[str, str] | None]] = []

    def run(name: str, *args: str, env: dict[str, str] | None = None) -> dict[str, object]:
        started.append((name, env))  # before starting: a VM that fails half-way up is stopped too
        fcvm("podman", "run", "-d", "--name", name, *args, env=env)
        return vm_row(name)

    yield run
    for name, env in reversed(started):
        fcvm("stop", name, env=env, check=False)
