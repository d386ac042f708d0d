"""fc-mock's QEMU: `QemuVm` plus the two things fc-mock's snapshot API asks of its backend."""

from __future__ import annotations

from pathlib import Path

from fcvm.vmm.qemu import QemuError, QemuVm, Qmp, qemu_version, qmp_socket, save_snapshot


class FcMockQemu(QemuVm):
    def vmm_version(self) -> str:
        with Qmp(qmp_socket(self.spec), timeout=10) as qmp:
            return qemu_version(qmp)

    def save(self, state: Path, memory: Path, header: bytes) -> None:
        """Firecracker's snapshot/create: the VM is paused and stays paused (`cont` comes with PATCH /vm Resumed)."""
        if self.spec.mem_file is None:
            raise QemuError("the guest's RAM is not a shared file, so it cannot be snapshotted")
        save_snapshot(qmp_socket(self.spec), state=state, memory=memory, ram_file=self.spec.mem_file,
                      header=header, resume=False)
