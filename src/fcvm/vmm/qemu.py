"""QEMU microvm backend: KVM when it can boot a standard guest, TCG otherwise; driven over QMP.

The agent channel is one virtio-serial port multiplexed by `fcvm.channel`, which exposes Firecracker's
vsock Unix-socket semantics at `spec.vsock_uds`, so nothing above the channel knows which VMM runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcvm.core import host, log
from fcvm.core.errors import FcvmError
from fcvm.core.proc import ProcessRef
from fcvm.core.wait import wait_until
from fcvm.vmm.base import MachineSpec, MemBackend, RestoreSpec
from fcvm.vmm.process import VmmProcess

AGENT_PORT_NAME = "org.fcvm.agent"


class QemuError(FcvmError):
    pass


STATE_FILE = "state"  # the device-state stream of a snapshot
MEMORY_FILE = "memory"  # the frozen guest RAM of a snapshot
_STATE_FD = "fcvm-state"


class Qmp:
    """One QMP connection; a failed command raises QemuError naming it."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.path = path
        self._monitor = QEMUMonitorProtocol(str(path))
        self._monitor.settimeout(timeout)

    def __enter__(self) -> Qmp:
        from qemu.qmp import QMPError

        try:
            self._monitor.connect()
        except (OSError, EOFError, QMPError) as exc:
            raise QemuError(f"cannot reach QEMU's monitor at {self.path}: {exc}") from exc
        return self

    def __exit__(self, *_exc: object) -> None:
        self._monitor.close()

    def cmd(self, command: str, **arguments: Any) -> Any:
        from qemu.qmp import QMPError

        try:
            return self._monitor.cmd(command, **arguments)
        except (OSError, EOFError, QMPError) as exc:
            raise QemuError(f"QMP {command} failed: {exc}") from exc

    def pass_file(self, name: str, fd: int) -> None:
        """Hand QEMU an open file as `fd:<name>` (no shell, no path QEMU must be able to open)."""
        self._monitor.send_fd_scm(fd)
        self.cmd("getfd", fdname=name)

    def ignore_shared_ram(self) -> None:
        """Leave RAM that lives in a shared file out of the migration stream: a snapshot is then only the device
        state, and the memory file is the RAM (7.2 accepts this capability over QMP only)."""
        self.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])

    def wait_status(self, query: str, done: Callable[[str], bool], timeout: float = 60.0) -> str:
        last = ""

        def finished() -> bool:
            nonlocal last
            last = str(self.cmd(query).get("status", ""))
            return done(last)

        if not wait_until(finished, timeout, interval=0.005):
            raise QemuError(f"QEMU stayed in {query} status {last!r} for {timeout:g} s")
        return last


def qemu_version(qmp: Qmp) -> str:
    version = qmp.cmd("query-version")
    qemu = version["qemu"]
    package = str(version.get("package", "")).strip()
    return f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}" + (f" ({package})" if package else "")


def save_snapshot(qmp_socket: Path, *, state: Path, memory: Path, ram_file: Path,
                  frozen: Callable[[], None] = lambda: None, resume: bool = True, header: bytes = b"") -> float:
    """Pause the VM, write its device state to `state` (after `header`, if given), freeze its shared RAM file into
    `memory` (a reflink), call `frozen` while it is still paused (to freeze its writable disks), and resume it
    unless told not to. Returns how long the guest was paused, in seconds."""
    from fcvm.storage.btrfs import clone_file

    with Qmp(qmp_socket) as qmp:
        qmp.ignore_shared_ram()
        paused_at = time.monotonic()
        qmp.cmd("stop")
        try:
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                unwritten = memoryview(header)
                while unwritten:  # QEMU writes the stream from the fd's offset on, after the header
                    unwritten = unwritten[os.write(fd, unwritten):]
                qmp.pass_file(_STATE_FD, fd)
            finally:
                os.close(fd)
            qmp.cmd("migrate", uri=f"fd:{_STATE_FD}")
            status = qmp.wait_status("query-migrate", lambda s: s not in ("setup", "active", "device", ""))
            if status != "completed":
                raise QemuError(f"QEMU could not save the device state (migration {status})")
            # With share=on the guest writes into its RAM file again after `cont`: the snapshot needs a frozen
            # copy, and a reflink is one without copying (0.2 s for any size here, mostly flushing dirty pages).
            clone_file(ram_file, memory)
            memory.chmod(0o600)  # guest memory: the snapshot's owner only
            frozen()
        finally:
            if resume:
                qmp.cmd("cont")
        return time.monotonic() - paused_at


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
        "-M", f"microvm{_memory_backend(spec)[0]}", "-m", str(spec.mem_mib), "-smp", str(spec.vcpus),
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-qmp", f"unix:{qmp_socket(spec)},server=on,wait=off",
        *_memory_backend(spec)[1],
    ]
    if spec.restore is not None:
        # The kernel is already in the snapshot's RAM; the same devices in the same order are all it needs.
        argv += ["-incoming", "defer"]
    else:
        argv += ["-kernel", str(spec.kernel), "-append", spec.boot_args]
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


def _memory_backend(spec: MachineSpec) -> tuple[str, list[str]]:
    """(`-M` suffix, arguments) for the guest RAM: a shared file (snapshot-capable), the snapshot's memory file
    mapped privately (a File restore), or anonymous RAM the preload library hands to the page server (Uffd)."""
    size = f"size={spec.mem_mib}M"
    restore = spec.restore
    if restore is not None and restore.backend == MemBackend.UFFD:
        backend = f"memory-backend-ram,id=mem,{size}"
    elif spec.mem_file is not None:  # booted, or a clone on its own reflink of the snapshot's memory
        backend = f"memory-backend-file,id=mem,{size},mem-path={spec.mem_file},share=on"
    elif restore is not None:
        # QEMU opens mem-path read-write even with share=off, but MAP_PRIVATE never writes back.
        backend = f"memory-backend-file,id=mem,{size},mem-path={restore.memory},share=off"
    else:
        return "", []
    return ",memory-backend=mem", ["-object", backend]


def serial_socket(spec: MachineSpec) -> Path:
    return spec.workdir / "serial.sock"


def qmp_socket(spec: MachineSpec) -> Path:
    return spec.workdir / "qmp.sock"


def _preload_env(spec: MachineSpec) -> dict[str, str] | None:
    restore = spec.restore
    if restore is None or restore.backend != MemBackend.UFFD:
        return None
    from fcvm.uffd import preload

    if restore.preload is None or restore.uffd_socket is None:
        raise QemuError("a Uffd restore needs the page server's socket and the preload library",
                        hint="run `fcvm setup uffd-preload`")
    return preload.env_for(restore.uffd_socket, spec.mem_mib << 20, restore.preload,
                           program=Path(qemu_binary()).name)


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
            console=spec.console_log, logger=self._log, own_group=own_session, env=_preload_env(spec),
        )
        self._bridge: Any = None
        self.version = ""  # QEMU's, read over QMP on a restore
        self.marks: dict[str, float] = {}

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
        if spec.restore is not None:
            self._restore(spec.restore)
        if spec.vsock_uds:
            self._start_bridge()

    def _restore(self, restore: RestoreSpec) -> None:
        """Load the device state into the stopped machine, check where its RAM comes from, and run it."""
        socket_path = qmp_socket(self.spec)
        if not wait_until(lambda: socket_path.exists() or self._vmm.exited(), 10, interval=0.002):
            raise QemuError("QEMU did not open its monitor within 10 s")
        if self._vmm.exited():
            raise QemuError(f"QEMU exited before the restore: {self._vmm.output()}")
        with Qmp(socket_path) as qmp:
            self.version = qemu_version(qmp)
            if restore.vmm_version and restore.vmm_version != self.version:
                raise QemuError(f"the snapshot was taken by QEMU {restore.vmm_version}, and this is QEMU "
                                f"{self.version}: its device state cannot be loaded", hint="take the snapshot again")
            if restore.backend == MemBackend.UFFD:
                self._check_page_server()
            qmp.ignore_shared_ram()
            fd = os.open(restore.state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.lseek(fd, restore.state_offset, os.SEEK_SET)  # QEMU reads the stream from the fd's offset
                qmp.pass_file(_STATE_FD, fd)
            finally:
                os.close(fd)
            qmp.cmd("migrate-incoming", uri=f"fd:{_STATE_FD}")
            status = qmp.wait_status("query-status", lambda s: s != "inmigrate")
            if status != "paused":
                raise QemuError(f"the snapshot did not load (QEMU status {status}): {self._vmm.output()}")
            self.marks["loaded"] = time.monotonic()
            qmp.cmd("cont")
            self.marks["resumed"] = time.monotonic()

    def _check_page_server(self) -> None:
        """Fail closed: a clone whose RAM is not served by the page server would run on zero-filled memory."""
        from fcvm.uffd import preload

        ref = self._vmm.ref
        assert ref is not None
        if not preload.verify_client(ref.pid):
            raise QemuError("QEMU's guest RAM is not registered with the page server (no userfaultfd in QEMU); "
                            "refusing to run the clone on empty memory")

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
        with Qmp(qmp_socket(self.spec), timeout=10) as qmp:
            return qmp.cmd(command, **arguments)

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
