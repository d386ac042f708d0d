"""`fcvm setup kernel`: build the guest kernel assets (bzImage, vmlinux, modules, initramfs)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from fcvm.guest import ensure_kernel

    kernel = ensure_kernel(getattr(args, "kernel_deb", None), progress=True)
    print(f"kernel    {kernel.version}")
    print(f"bzImage   {kernel.bzimage}")
    print(f"vmlinux   {kernel.vmlinux}")
    print(f"initramfs {kernel.initramfs}")
    print(f"modules   {kernel.modules}")
    return 0
