from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator

import pytest

from tests.support import require


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
