"""Storage on a real btrfs loop device: per-VM disks are reflinks (shared extents, checked with FIEMAP), and
`fcvm setup storage` turns a fresh data dir into a btrfs loopback, keeps what was there, and is idempotent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.storage.btrfs import clone_file, filesystem_type, loop_image_path
from fcvm.storage.disks import make_vm_disk
from tests.support import allocated_bytes, require, require_root, require_tool, shared_bytes

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _root_and_btrfs() -> None:
    require_root()
    require_tool("mkfs.btrfs", "mount", "umount", "losetup")
    require(Path("/dev/loop-control").exists(), "needs loop devices (/dev/loop-control)")


def _mount_count(mount_point: Path) -> int:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sum(line.split()[4] == str(mount_point) for line in lines)


def _loop_devices_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout


def _unmount_all(mount_point: Path) -> None:
    while _mount_count(mount_point):
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 256 MiB btrfs on a loop device (mount -o loop: the device goes away with the mount)."""
    require(filesystem_type(tmp_path) != "btrfs", f"{tmp_path} is btrfs already")
    image, mount_point = tmp_path / "btrfs.img", tmp_path / "mnt"
    mount_point.mkdir()
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        _unmount_all(mount_point)
    assert _loop_devices_of(image) == ""


def _base_image(path: Path) -> bytes:
    """A 64 MiB disk image: 8 MiB of data, the rest a hole, like the rootfs (mostly holes)."""
    data = os.urandom(8 * MiB)
    with open(path, "wb") as image:
        image.write(data)
        image.truncate(64 * MiB)
        os.fsync(image.fileno())
    return data


def test_a_per_vm_disk_on_btrfs_is_a_reflink_that_shares_every_extent(btrfs: Path) -> None:
    base = btrfs / "assets" / "rootfs.ext4"
    base.parent.mkdir()
    data = _base_image(base)
    vm_dir = btrfs / "vms" / "abc"
    vm_dir.mkdir(parents=True)
    disk = make_vm_disk(base, vm_dir)
    assert allocated_bytes(base) >= 8 * MiB
    assert shared_bytes(disk, base) == allocated_bytes(disk) == allocated_bytes(base)
    # Copy on write: the VM's writes land in new extents of its own disk; the base never changes.
    with open(disk, "r+b") as writer:
        writer.write(b"guest wrote here" * 4096)
        os.fsync(writer.fileno())
    with open(base, "rb") as reader:
        assert reader.read(len(data)) == data
    assert 0 < shared_bytes(disk, base) < allocated_bytes(disk)


def test_without_btrfs_the_disk_is_a_full_copy_that_shares_nothing(btrfs: Path, tmp_path: Path) -> None:
    """The other side of the check above: the fallback copy (here on the ext4 beside the btrfs) shares nothing,
    so the shared-extent assertions can tell a reflink from a copy."""
    base = btrfs / "rootfs.ext4"
    _base_image(base)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert clone_file(base, plain / "copy.ext4") is False
    assert filesystem_type(plain) != "btrfs"
    on_btrfs_copy = btrfs / "copy.ext4"
    subprocess.run(["cp", "--reflink=never", str(base), str(on_btrfs_copy)], check=True)
    assert shared_bytes(on_btrfs_copy, base) == 0


def _setup_storage(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fcvm", "setup", "storage", "--size", "256M"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "FCVM_DATA_DIR": str(data_dir)}, check=False)


def test_setup_storage_makes_a_fresh_data_dir_btrfs_keeps_its_contents_and_is_idempotent(tmp_path: Path) -> None:
    require(filesystem_type(tmp_path) != "btrfs", f"{tmp_path} is btrfs already")
    data_dir = tmp_path / "data"
    (data_dir / "logs").mkdir(parents=True)
    (data_dir / "logs" / "kept.log").write_text("state from before\n")
    image = loop_image_path(data_dir)
    try:
        first = _setup_storage(data_dir)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == f"{data_dir} is now a btrfs loopback ({image}, 256M); reflinks work"
        assert filesystem_type(data_dir) == "btrfs" and image.is_file()
        assert _mount_count(data_dir) == 1
        assert (data_dir / "logs" / "kept.log").read_text() == "state from before\n"

        again = _setup_storage(data_dir)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f"{data_dir} is on btrfs and reflinks work"
        assert _mount_count(data_dir) == 1, "a second run mounted the image again"

        base = data_dir / "assets" / "rootfs.ext4"
        base.parent.mkdir()
        _base_image(base)
        vm_dir = data_dir / "vms" / "abc"
        vm_dir.mkdir(parents=True)
        disk = make_vm_disk(base, vm_dir)
        assert shared_bytes(disk, base) == allocated_bytes(base) >= 8 * MiB
    finally:
        _unmount_all(data_dir)
    assert _loop_devices_of(image) == ""
    # What setup moved into the image is in the image, not left in the directory it was mounted over.
    assert list(data_dir.iterdir()) == []
