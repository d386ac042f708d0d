"""Which hypervisor fc-mock boots on InstanceStart, and how it gets Firecracker's kernel to boot.

Kernel: Firecracker (<= 1.16) boots an uncompressed ELF `vmlinux`. QEMU loads an ELF `-kernel`
only through its PVH entry point (the XEN_ELFNOTE_PHYS32_ENTRY note, present when the kernel is
built with CONFIG_PVH=y). Measured here (QEMU 7.2, `-M microvm`, TCG): the Debian bookworm
`6.1.0-*-cloud-amd64` vmlinux has CONFIG_PVH=y and the note, and boots directly to the same
console output as its bzImage. So fc-mock hands QEMU the vmlinux it was given. Only for an ELF
without the PVH note does it fall back to a `bzImage` in the same directory (the asset layout
`fcvm setup kernel` produces) and logs that it did; without one, QEMU's own error is reported.

Backend: `fcvm.vmm.qemu.QemuVm`, with what snapshots need (qemu_backend.py). For tests,
`FCVM_FC_MOCK_BACKEND=module:attr` or `/path/file.py:attr` names another factory
`(MachineSpec) -> backend`; fc-mock still identifies itself as fc-mock, so this can never pass
for Firecracker.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import struct
from pathlib import Path
from typing import cast

from fcvm.core import log
from fcvm.vmm.base import MachineSpec
from fcvm_standins.fc_mock.api import Backend, BackendFactory

_log = log.get("fc_mock")

BACKEND_ENV = "FCVM_FC_MOCK_BACKEND"
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 0x12


def has_pvh_note(path: Path) -> bool | None:
    """True/False for an ELF64 with/without the PVH entry note; None if `path` is not an ELF64."""
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return None
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
            if p_type != _PT_NOTE:
                continue
            f.seek(p_offset)
            notes = f.read(p_filesz)
            pos = 0
            while pos + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
                if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
                pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def qemu_kernel(kernel: Path) -> Path:
    """The kernel to give QEMU for the kernel Firecracker was given."""
    if has_pvh_note(kernel) is not False:  # PVH-capable ELF, or not an ELF at all (bzImage)
        return kernel
    fallback = kernel.parent / "bzImage"
    if fallback.is_file():
        _log.warning("%s has no PVH entry note, QEMU cannot boot it: booting %s instead", kernel, fallback)
        return fallback
    _log.warning("%s has no PVH entry note and there is no bzImage beside it: QEMU will likely refuse it",
                 kernel)
    return kernel


def _load_attr(target: str) -> object:
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise ValueError(f"{BACKEND_ENV} must be module:attr or /path/file.py:attr, not {target!r}")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location("fc_mock_backend", where)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, attr)


def default_factory() -> BackendFactory:
    override = os.environ.get(BACKEND_ENV)
    if override:
        _log.info("backend from %s=%s", BACKEND_ENV, override)
        return cast(BackendFactory, _load_attr(override))

    def qemu(spec: MachineSpec) -> Backend:
        from fcvm_standins.fc_mock.qemu_backend import FcMockQemu

        if spec.restore is None:  # a restore boots no kernel: it is in the snapshot's memory
            spec.kernel = qemu_kernel(spec.kernel)
        # In fc-mock's process group: fcvm kills Firecracker's group when it reaps the VMM, so a SIGKILLed
        # fc-mock never leaves its guest running (a real Firecracker's guest dies with it).
        return FcMockQemu(spec, own_session=False)

    return qemu
