"""Per-VM disks: a reflink copy of the base rootfs image."""

from __future__ import annotations

from pathlib import Path

from fcvm.storage.btrfs import clone_file


def make_vm_disk(base: Path, vm_dir: Path) -> Path:
    disk = vm_dir / "rootfs.ext4"
    clone_file(base, disk)
    return disk
