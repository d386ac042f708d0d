"""fcvm.guest: the guest kernel (deb -> bzImage, vmlinux, initramfs), rootfs (mmdebstrap -> ext4) and the
local demo container images. Everything is content-addressed under `fcvm.core.paths.assets_dir()`."""

from fcvm.guest.images import build_demo_images
from fcvm.guest.kernel import (
    KernelAssets,
    ensure_kernel,
    find_kernel,
    host_tsc_khz,
    qemu_boot_args,
)
from fcvm.guest.rootfs import ensure_rootfs, find_rootfs

__all__ = [
    "KernelAssets",
    "build_demo_images",
    "ensure_kernel",
    "ensure_rootfs",
    "find_kernel",
    "find_rootfs",
    "host_tsc_khz",
    "qemu_boot_args",
]
