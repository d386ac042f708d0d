"""A running VM's disk is a reflink of the base rootfs: its blocks are the rootfs's own (FIEMAP), not a copy."""

from __future__ import annotations

import os

from fcvm.core import paths
from fcvm.guest import find_rootfs
from fcvm.storage.btrfs import filesystem_type
from tests.support import allocated_bytes, require, shared_bytes
from tests.vm.support import RunVm


def test_the_per_vm_disk_shares_the_rootfs_extents_while_the_vm_runs(run_vm: RunVm) -> None:
    rootfs = find_rootfs()
    assert rootfs is not None
    data_dir = paths.ensure_dir(paths.data_dir())
    require(filesystem_type(data_dir) == "btrfs", f"{data_dir} is not btrfs (run `fcvm setup storage`)")
    require(os.stat(data_dir).st_dev == os.stat(rootfs).st_dev, f"{rootfs} is on another filesystem")
    row = run_vm("-d", "--name", "reflinked", "localhost/fcvm-busybox", "sleep", "600")
    assert row["status"] == "running"
    disk = paths.vm_dir(str(row["id"])) / "rootfs.ext4"
    # The guest has written to its disk by now (podman loaded the image into it); those blocks are its own.
    # A copy would share none of the rootfs's blocks; a reflink shares all it has not overwritten.
    base = allocated_bytes(rootfs)
    shared = shared_bytes(disk, rootfs)
    assert shared >= base // 2, f"the VM's disk shares {shared >> 20} MiB of the rootfs's {base >> 20} MiB"
