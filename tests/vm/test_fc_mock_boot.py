"""A real boot through fc-mock: FirecrackerVm -> fcvm-fc-mock (Firecracker API) -> QemuVm (TCG).

The guest gets what Firecracker would get: the ELF vmlinux (QEMU boots it via its PVH note), the
initramfs and a root drive. The drive is blank, so /init reaches userspace, loads its modules, sees
/dev/vda, fails to mount it and powers off; fc-mock then exits 0, as Firecracker does when its guest
shuts down.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fcvm.vmm.base import Drive, MachineSpec
from fcvm.vmm.firecracker.vm import FirecrackerVm
from tests.support import require

SPEC_PATH = Path(__file__).resolve().parents[2].parent / "shared/firecracker/firecracker-v1.16.1.yaml"


def test_guest_reaches_userspace_through_fc_mock(tmp_path: Path) -> None:
    require(shutil.which("qemu-system-x86_64") is not None, "needs qemu-system-x86_64")
    binary = shutil.which("fcvm-fc-mock")
    require(binary is not None, "fcvm-fc-mock is not installed (pip install -e .)")
    require(SPEC_PATH.is_file(), f"the official Firecracker spec is missing at {SPEC_PATH}")
    from fcvm.guest import find_kernel
    from fcvm.guest.kernel import qemu_boot_args

    assets = find_kernel()
    require(assets is not None, "guest kernel and initramfs are not built: run `fcvm setup kernel`")
    assert assets is not None and binary is not None
    os.environ.setdefault("FCVM_FC_SPEC", str(SPEC_PATH))

    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * (1 << 20))
    spec = MachineSpec(
        name="fcmock",
        workdir=tmp_path / "vm",
        kernel=assets.vmlinux,
        initrd=assets.initramfs,
        boot_args=qemu_boot_args().replace(" quiet", ""),
        vcpus=1,
        mem_mib=512,
        drives=[Drive("root", blank, root=True)],
    )
    vm = FirecrackerVm(spec, binary=Path(binary), mmds=None)
    vm.start()
    try:
        assert vm.name == "firecracker (fc-mock)"
        code = vm.wait(timeout=180)
    finally:
        vm.stop(timeout=5)
    console = spec.console_log.read_text(errors="replace")
    assert "Run /init as init process" in console, console[-2000:]
    assert "fcvm-init: loaded modules:" in console, console[-2000:]  # userspace: the initramfs /init
    assert "root=/dev/vda rw pci=off" in console  # what Firecracker appends, fc-mock appends
    assert "fcvm-init: cannot mount /dev/vda" in console, console[-2000:]  # the drive reached the guest
    assert code == 0, console[-2000:]
    assert not vm.process.alive()
    assert sorted(os.listdir(spec.workdir)) == ["console.log"]
