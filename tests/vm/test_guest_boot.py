"""Boot the real guest assets (Debian cloud kernel, initramfs, bookworm rootfs) under QEMU microvm (TCG).

The assets are content-addressed and shared (FCVM_ASSETS_DIR), so only the first session downloads and
builds them. Each boot uses a scratch copy of the rootfs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core import paths
from fcvm.guest import KernelAssets, ensure_kernel, ensure_rootfs, find_kernel, find_rootfs, qemu_boot_args
from fcvm.guest import kernel as kernel_module
from fcvm.guest import rootfs as rootfs_module
from fcvm.guest.images import DEMO_TEXT, HTTPD_IMAGE, build_demo_images
from fcvm.guest.modules import REQUIRED_MODULES
from fcvm.guest.rootfs import MIRROR_ENV
from fcvm.guest.vmlinux import elf_info
from tests.support import require, require_root, require_tool

QEMU = [
    "qemu-system-x86_64", "-accel", "tcg,thread=single", "-cpu", "max", "-M", "microvm", "-m", "1024",
    "-smp", "2", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
]  # fmt: skip


@pytest.fixture(scope="module")
def built() -> tuple[KernelAssets, Path]:
    require_root()
    require_tool("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "dpkg-deb", "depmod", "debugfs")
    kernel = ensure_kernel(progress=False)
    return kernel, ensure_rootfs(kernel, progress=False)


@pytest.fixture
def scratch(built: tuple[KernelAssets, Path], tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "rootfs.ext4"
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(built[1]), str(disk)], check=True)
    yield disk


def boot(kernel: KernelAssets, *drives: Path, extra_args: str = "", timeout: float = 240) -> str:
    """Boot, wait for the VM to exit by itself, return the console output."""
    argv = [*QEMU, "-kernel", str(kernel.bzimage), "-initrd", str(kernel.initramfs),
            "-append", f"{qemu_boot_args()} {extra_args}".strip()]  # fmt: skip
    for i, drive in enumerate(drives):
        argv += ["-drive", f"id=d{i},file={drive},format=raw,if=none" + (",readonly=on" if i else ""),
                 "-device", f"virtio-blk-device,drive=d{i}"]  # fmt: skip
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        pytest.fail(f"the guest did not power off within {timeout} s; console:\n{out[-3000:]}")
    console = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"qemu exited {done.returncode}: {done.stderr.decode()[-2000:]}\n{console[-3000:]}"
    return console


def loaded_modules(console: str) -> list[str]:
    match = re.search(r"^fcvm-init: loaded modules:(.*)$", console, re.M)
    assert match, f"init did not report its modules; console:\n{console[-3000:]}"
    return match.group(1).split()


def test_guest_boots_into_the_rootfs_and_runs_podman(built: tuple[KernelAssets, Path], scratch: Path) -> None:
    kernel, _ = built
    hook = 'fcvm_init="podman --version; echo marker=$fcvm_marker; poweroff -f" fcvm_marker=42'
    console = boot(kernel, scratch, extra_args=hook)
    modules = loaded_modules(console)
    for name in REQUIRED_MODULES:
        assert name in modules
    # dependencies were loaded before their users
    assert modules.index("virtio_ring") < modules.index("virtio_mmio") < modules.index("virtio_blk")
    assert re.search(r"^podman version 4\.\d+\.\d+", console, re.M), console[-3000:]
    assert "marker=42" in console  # fcvm_* kernel arguments reach the new root's environment
    assert "fcvm-init:" not in console.replace("fcvm-init: loaded modules:", "")


def test_init_failure_is_reported_and_powers_off(built: tuple[KernelAssets, Path]) -> None:
    """No root disk: init must say what failed and power off instead of hanging."""
    console = boot(built[0], timeout=120)
    assert "fcvm-init: no root disk: /dev/vda did not appear within 10 s" in console
    assert "Power down" in console


def test_vmlinux_is_an_elf_at_the_kernel_load_address(built: tuple[KernelAssets, Path]) -> None:
    kernel, _ = built
    image = kernel.vmlinux.read_bytes()
    assert image[:4] == b"\x7fELF"
    info = elf_info(image)
    assert info.machine == 62  # EM_X86_64
    config = (kernel.bzimage.parent / "config").read_text()
    start = int(re.search(r"^CONFIG_PHYSICAL_START=(0x[0-9a-f]+)$", config, re.M).group(1), 16)  # type: ignore[union-attr]
    assert info.entry == start == 0x1000000  # startup_64, where Firecracker jumps
    assert info.entry in info.load_paddrs
    # The bzImage records the uncompressed size in the payload's last four bytes.
    bz = kernel.bzimage.read_bytes()
    offset, length = int.from_bytes(bz[0x248:0x24C], "little"), int.from_bytes(bz[0x24C:0x250], "little")
    start_payload = (bz[0x1F1] + 1) * 512 + offset
    assert len(image) == int.from_bytes(bz[start_payload + length - 4 : start_payload + length], "little")


def test_rootfs_holds_the_recipe(built: tuple[KernelAssets, Path]) -> None:
    kernel, image = built

    def cat(path: str) -> str:
        out = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
        return out.stdout.decode()

    conf = cat("/etc/containers/containers.conf")
    for line in ('log_driver = "k8s-file"', 'cgroup_manager = "cgroupfs"', 'events_logger = "file"',
                 'runtime = "crun"'):  # fmt: skip
        assert line in conf
    assert 'driver = "overlay"' in cat("/etc/containers/storage.conf")
    assert cat("/etc/hostname").strip() == "fcvm"
    assert cat("/etc/resolv.conf") == ""
    assert "modules.dep" in subprocess.run(
        ["debugfs", "-R", f"ls /usr/lib/modules/{kernel.version}", str(image)], capture_output=True, check=True
    ).stdout.decode()
    assert image.stat().st_size == 2 << 30


def test_assets_are_found_and_a_warm_ensure_builds_nothing(
    built: tuple[KernelAssets, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, image = built

    def no_build(*args: object) -> None:
        raise AssertionError("a warm ensure rebuilt an asset")

    for module, builder in ((kernel_module, "_build_kernel_dir"), (kernel_module, "_build_initramfs"),
                            (rootfs_module, "_build")):
        monkeypatch.setattr(module, builder, no_build)
    image_inode = image.stat().st_ino
    again = ensure_kernel(progress=False)
    image_again = ensure_rootfs(again, progress=False)
    assert (again, image_again) == (kernel, image)
    assert image_again.stat().st_ino == image_inode
    assert find_kernel() == kernel
    assert find_rootfs() == image


def test_demo_httpd_serves_its_page_inside_the_guest(
    built: tuple[KernelAssets, Path], scratch: Path, tmp_path: Path
) -> None:
    require_tool("podman")
    build_demo_images()
    archive = tmp_path / "demo.tar"
    subprocess.run(["podman", "save", "--format", "docker-archive", "-o", str(archive), HTTPD_IMAGE], check=True,
                   capture_output=True)  # fmt: skip
    script = tmp_path / "hook.sh"
    script.write_text(
        "ip link set lo up\n"
        "echo +cpu +memory +pids +io > /sys/fs/cgroup/cgroup.subtree_control\n"
        "podman load -q -i /dev/vdb\n"
        f"podman run -d --network host --name web {HTTPD_IMAGE}\n"
        "python3 - <<'EOF'\n"
        "import time, urllib.request\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        print('PAGE:', urllib.request.urlopen('http://127.0.0.1/', timeout=2).read().decode())\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.2)\n"
        "EOF\n"
        "poweroff -f\n"
    )
    subprocess.run(["debugfs", "-w", "-R", f"write {script} /fcvm-hook.sh", str(scratch)], check=True,
                   capture_output=True)  # fmt: skip
    console = boot(built[0], scratch, archive, extra_args='fcvm_init="sh /fcvm-hook.sh"')
    assert "PAGE:" in console and DEMO_TEXT in console, console[-3000:]


def test_rootfs_builds_offline_from_the_package_cache(
    built: tuple[KernelAssets, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh assets dir whose cache holds the .debs builds with the Debian mirror unreachable."""
    shared_cache = paths.cache_dir()
    require((shared_cache / "debs" / "bookworm").is_dir(), "the shared package cache is empty")
    offline_assets = tmp_path / "offline" / "assets"
    monkeypatch.setenv(paths.ASSETS_DIR_ENV, str(offline_assets))
    cache = paths.cache_dir()
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copy2(src, dst)

    shutil.copytree(shared_cache / "debs", cache / "debs", copy_function=link_or_copy)
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9/debian")  # nothing listens on the discard port
    kernel = ensure_kernel(progress=False)
    image = ensure_rootfs(kernel, progress=False)
    assert image.parent == offline_assets and image.is_file()
    assert image.name == built[1].name  # same recipe, same kernel: same name
