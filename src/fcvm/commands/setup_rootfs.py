"""`fcvm setup rootfs`: build the guest root filesystem image (and the kernel whose modules it carries)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from fcvm.guest import ensure_kernel, ensure_rootfs, find_kernel

    # The rootfs carries the modules of the kernel set up last (`fcvm setup kernel --kernel-deb`).
    kernel = find_kernel() or ensure_kernel(progress=True)
    print(f"rootfs    {ensure_rootfs(kernel, progress=True)}")
    return 0
