"""QEMU microvm backend: KVM when it can boot a standard guest, TCG otherwise; driven over QMP.

The agent channel is one virtio-serial port multiplexed by `fcvm.channel`, which exposes Firecracker's
vsock Unix-socket semantics at `spec.vsock_uds`, so nothing above the channel knows which VMM runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from fcvm.core import host, log
from fcvm.core.errors import FcvmError
from fcvm.core.proc import ProcessRef
from fcvm.core.wait import wait_until
from fcvm.vmm.base import MachineSpec
from fcvm.vmm.process import VmmProcess

AGENT_PORT_NAME = "org.fcvm.agent"


class QemuError(FcvmError):
    pass


def qemu_binary() -> str:
    binary = host.which("qemu-system-x86_64")
    if binary is None:
        raise QemuError("qemu-system-x86_64 is not installed", hint="apt-get install qemu-system-x86")
    return binary


def build_argv(spec: MachineSpec, *, use_kvm: bool) -> list[str]:
    # TCG runs every vCPU in one host thread (thread=single), not one thread each. With multi-threaded TCG about
    # one boot in 30-60 hung for good here when podman started a container: both vCPUs soft-locked in the
    # kernel with the RCU thread starved, the pattern of a lost inter-processor interrupt. Round-robin TCG
    # has no cross-thread wake-ups to lose; it costs ~2.5 s per boot (11.4 vs 9.0 s to a finished container).
    accel = ["-accel", "kvm", "-cpu", "host"] if use_kvm else ["-accel", "tcg,thread=single", "-cpu", "max"]
    argv = [
        qemu_binary(), *accel,
        "-M", "microvm", "-m", str(spec.mem_mib), "-smp", str(spec.vcpus),
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-kernel", str(spec.kernel), "-append", spec.boot_args,
        "-qmp", f"unix:{spec.workdir / 'qmp.sock'},server=on,wait=off",
    ]
    if spec.initrd:
        argv += ["-initrd", str(spec.initrd)]
    # Root drive first, so it is /dev/vda as under Firecracker.
    for drive in sorted(spec.drives, key=lambda d: not d.root):
        readonly = ",readonly=on" if drive.read_only else ""
        argv += [
            "-drive", f"id={drive.drive_id},file={drive.path},format=raw,if=none,cache=unsafe{readonly}",
            "-device", f"virtio-blk-device,drive={drive.drive_id}",
        ]
    if spec.tap:
        mac = f",mac={spec.guest_mac}" if spec.guest_mac else ""
        argv += [
            "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=net0{mac}",
        ]
    if spec.vsock_uds:
        argv += [
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={serial_socket(spec)},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    return argv


def serial_socket(spec: MachineSpec) -> Path:
    return spec.workdir / "serial.sock"


class QemuVm:
    def __init__(self, spec: MachineSpec, *, use_kvm: bool | None = None, own_session: bool = True) -> None:
        """`own_session=False` keeps QEMU in its parent's process group (fc-mock's): whoever kills that group
        takes the guest along, as a guest dies with a real Firecracker process."""
        self.spec = spec
        self.use_kvm = host.kvm_status().usable if use_kvm is None else use_kvm
        self.name = "qemu"
        self._log = log.get(f"vm.{spec.name}")
        # Its own session: a terminal's Ctrl-C reaches fcvm, which stops the container first, not QEMU.
        self._vmm = VmmProcess(
            [*spec.enter_argv, *build_argv(spec, use_kvm=self.use_kvm)],
            console=spec.console_log, logger=self._log, own_group=own_session,
        )
        self._bridge: Any = None

    @property
    def process(self) -> ProcessRef:
        ref = self._vmm.ref
        if ref is None:
            raise QemuError("QEMU has not been started")
        return ref

    def start(self) -> None:
        spec = self.spec
        for stale in (spec.workdir / "qmp.sock", serial_socket(spec)):
            stale.unlink(missing_ok=True)
        self._vmm.start()
        if spec.vsock_uds:
            self._start_bridge()

    def _start_bridge(self) -> None:
        from fcvm.channel import SerialVsockBridge

        assert self.spec.vsock_uds is not None
        socket_path = serial_socket(self.spec)
        if not wait_until(lambda: socket_path.exists() or self._vmm.exited(), 10, interval=0.01):
            raise QemuError("QEMU did not create its agent socket within 10 s")
        if not socket_path.exists():
            raise QemuError(f"QEMU exited during start-up: {self._vmm.output()}")
        self._bridge = SerialVsockBridge(socket_path, self.spec.vsock_uds)
        self._bridge.start()

    def _qmp(self, command: str, **arguments: Any) -> Any:
        from qemu.qmp import QMPError
        from qemu.qmp.legacy import QEMUMonitorProtocol

        monitor = QEMUMonitorProtocol(str(self.spec.workdir / "qmp.sock"))
        try:
            monitor.connect()
            return monitor.cmd(command, **arguments) if arguments else monitor.cmd(command)
        except (OSError, EOFError, QMPError) as exc:
            raise QemuError(f"QMP {command} failed: {exc}") from exc
        finally:
            monitor.close()

    def wait(self, timeout: float | None = None) -> int | None:
        return self._vmm.wait(timeout)

    def pause(self) -> None:
        self._qmp("stop")

    def resume(self) -> None:
        self._qmp("cont")

    def stop(self, timeout: float = 10.0) -> None:
        if not self._vmm.exited():
            with contextlib.suppress(QemuError):
                self._qmp("quit")
            self._vmm.wait(timeout)
        self._vmm.stop()
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
