"""Which VMM runs a VM: `--hypervisor auto` is Firecracker when it can really boot a guest here, else QEMU."""

from __future__ import annotations

from pathlib import Path

from fcvm.core import host
from fcvm.core.errors import FcvmError, UsageError
from fcvm.core.kinds import HYPERVISOR_CHOICES, VmmKind


def choose_hypervisor(requested: str, firecracker_bin: str | None) -> tuple[VmmKind, Path | None]:
    """The VMM to use and, for Firecracker, its binary."""
    from fcvm.vmm.firecracker.binary import find_firecracker

    if requested not in HYPERVISOR_CHOICES:
        raise UsageError(f"unknown --hypervisor {requested!r}: use {', '.join(HYPERVISOR_CHOICES)}")
    binary = find_firecracker(firecracker_bin)
    if requested == VmmKind.FIRECRACKER:
        if binary is None:
            raise FcvmError("no firecracker binary found",
                            hint="fcvm setup firecracker, --firecracker-bin, or FCVM_FIRECRACKER_BIN")
        return VmmKind.FIRECRACKER, binary
    if requested == "auto" and binary is not None and host.kvm_status().usable:
        return VmmKind.FIRECRACKER, binary
    from fcvm.vmm.qemu import qemu_binary

    qemu_binary()  # a clear error if QEMU is missing too
    return VmmKind.QEMU, None
