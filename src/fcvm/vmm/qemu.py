"""QEMU microvm backend: KVM when it can boot a standard guest, TCG otherwise; driven over QMP.

The agent channel is one virtio-serial port multiplexed by `fcvm.channel`, which exposes Firecracker's
vsock Unix-socket semantics at `spec.vsock_uds`, so nothing above the channel knows which VMM runs.

QEMU parses the untrusted guest's device I/O, so it runs sandboxed (seccomp: no exec, no setuid) and, given
`spec.vmm_uid` (bridged mode, as root), as a uid of its own with no capabilities: `setpriv` drops them after
`nsenter`, so QEMU never holds root. It gets everything private open (`Handover`): its sockets, disks and RAM
are opened by fcvm and inherited, so QEMU needs no path into fcvm's directories, which stay root's alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator, Sequence
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
# Everything the guest can reach goes through QEMU; what QEMU never needs, it may never do.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Bridged QEMU's uids, one per VM: beside the jailed Firecracker's range (jail.JAIL_UID_BASE), apart from it.
VMM_UID_BASE = 1_910_000_000
VMM_UID_COUNT = 65536


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
        with contextlib.suppress(OSError, EOFError):  # QEMU may be gone already (after `quit`)
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
                  frozen: Callable[[], None] = lambda: None, disks: Sequence[Path] = (),
                  resume: bool = True, header: bytes = b"") -> float:
    """Pause the VM, write its device state to `state` (after `header`, if given), freeze its shared RAM file into
    `memory` (a reflink), call `frozen` while it is still paused (to freeze its writable `disks`), and resume it
    unless told not to. Returns how long the guest was paused, in seconds."""
    from fcvm.storage.btrfs import clone_file

    # Write the dirty pages of what gets reflinked back while the guest still runs: a reflink in the pause then
    # flushes only what the guest dirties meanwhile (one that had just written 512 MiB was paused 0.6-1.8 s).
    for path in (ram_file, *disks):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
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


class Handover:
    """What QEMU is given open instead of by path: its monitor and agent sockets, its disks, its RAM file and, for
    a Uffd restore, its page server connection and /dev/userfaultfd. fcvm opens them; QEMU inherits the fds and
    fcvm closes its own copies. QEMU, perhaps a uid of its own, then needs no way into fcvm's directories."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._fdsets = 0

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def listener(self, path: Path) -> int:
        """A Unix socket listening at `path` for QEMU to serve on: fcvm binds it, so the file is fcvm's and QEMU
        cannot put another socket (say, a host daemon's) where fcvm connects."""
        path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen(16)
            return self.keep(listener.detach())

    def disk(self, path: Path, *, writable: bool) -> tuple[list[str], str]:
        """(`-add-fd` arguments, `/dev/fdset/N`) for a disk. QEMU's block layer opens it read-only, then again
        read-write when it comes to write, each time taking an fd of that mode from the set: a writable disk's
        set holds both. Image locking is off for it: QEMU's locks are OFD locks, the set's own fds keep a lock
        QEMU released, and QEMU then collides with itself when it takes the disk back after a snapshot. They
        guard nothing here anyway: every VM writes a disk of its own, and shared disks are read-only."""
        self._fdsets += 1
        arguments = []
        for mode in (os.O_RDONLY, os.O_RDWR) if writable else (os.O_RDONLY,):
            fd = self.keep(os.open(path, mode | os.O_CLOEXEC))
            arguments += ["-add-fd", f"fd={fd},set={self._fdsets}"]
        return arguments, f"/dev/fdset/{self._fdsets}"

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def build_argv(spec: MachineSpec, *, use_kvm: bool, handover: Handover) -> list[str]:
    # TCG runs every vCPU in one host thread (thread=single), not one thread each. With multi-threaded TCG about
    # one boot in 30-60 hung for good here when podman started a container: both vCPUs soft-locked in the
    # kernel with the RCU thread starved, the pattern of a lost inter-processor interrupt. Round-robin TCG
    # has no cross-thread wake-ups to lose; it costs ~2.5 s per boot (11.4 vs 9.0 s to a finished container).
    accel = ["-accel", "kvm", "-cpu", "host"] if use_kvm else ["-accel", "tcg,thread=single", "-cpu", "max"]
    machine, memory = _memory_backend(spec, handover)
    monitor = handover.listener(qmp_socket(spec))
    argv = [
        qemu_binary(), "-sandbox", SANDBOX, *accel,
        "-M", f"microvm{machine}", "-m", str(spec.mem_mib), "-smp", str(spec.vcpus),
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-chardev", f"socket,id=qmp,fd={monitor},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        *memory,
    ]
    if spec.restore is not None:
        # The kernel is already in the snapshot's RAM; the same devices in the same order are all it needs.
        argv += ["-incoming", "defer"]
    else:
        # Shared, world-readable assets: QEMU reads them by path, whatever its uid.
        argv += ["-kernel", str(spec.kernel), "-append", spec.boot_args]
        if spec.initrd:
            argv += ["-initrd", str(spec.initrd)]
    # Root drive first, so it is /dev/vda as under Firecracker.
    for drive in sorted(spec.drives, key=lambda d: not d.root):
        readonly = ",readonly=on" if drive.read_only else ""
        add_fds, path = handover.disk(drive.path, writable=not drive.read_only)
        argv += [
            *add_fds,
            "-drive", f"id={drive.drive_id},file={path},file.locking=off,format=raw,if=none,cache=unsafe{readonly}",
            "-device", f"virtio-blk-device,drive={drive.drive_id}",
        ]
    if spec.tap:
        mac = f",mac={spec.guest_mac}" if spec.guest_mac else ""
        argv += [
            "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=net0{mac}",
        ]
    if spec.vsock_uds:
        agent = handover.listener(serial_socket(spec))
        argv += [
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,fd={agent},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    return argv


def _memory_backend(spec: MachineSpec, handover: Handover) -> tuple[str, list[str]]:
    """(`-M` suffix, arguments) for the guest RAM: a shared file (snapshot-capable), the snapshot's memory file
    mapped privately (a File restore), or anonymous RAM the preload library hands to the page server (Uffd).

    QEMU 7.2 opens `mem-path` itself (no fd sets there), read-write even with share=off (MAP_PRIVATE never writes
    back). It is given `/proc/self/fd/N`, an fd it inherited and reopens: that takes the file's permission, but no
    path through fcvm's directories."""
    size = f"size={spec.mem_mib}M"
    restore = spec.restore
    if restore is not None and restore.backend == MemBackend.UFFD:
        backend = f"memory-backend-ram,id=mem,{size}"
    elif spec.mem_file is not None:  # booted, or a clone on its own reflink of the snapshot's memory
        fd = handover.keep(os.open(spec.mem_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        if spec.vmm_uid is not None:
            os.fchown(fd, spec.vmm_uid, spec.vmm_uid)  # the VM's own RAM: its QEMU writes it
        backend = f"memory-backend-file,id=mem,{size},mem-path=/proc/self/fd/{fd},share=on"
    elif restore is not None:
        fd = handover.keep(os.open(restore.memory, os.O_RDONLY | os.O_CLOEXEC))
        backend = f"memory-backend-file,id=mem,{size},mem-path=/proc/self/fd/{fd},share=off"
    else:
        return "", []
    return ",memory-backend=mem", ["-object", backend]


def serial_socket(spec: MachineSpec) -> Path:
    return spec.workdir / "serial.sock"


def qmp_socket(spec: MachineSpec) -> Path:
    return spec.workdir / "qmp.sock"


def _preload_env(spec: MachineSpec, handover: Handover) -> dict[str, str] | None:
    restore = spec.restore
    if restore is None or restore.backend != MemBackend.UFFD:
        return None
    from fcvm.uffd import preload

    if restore.preload is None or restore.uffd_socket is None:
        raise QemuError("a Uffd restore needs the page server's socket and the preload library",
                        hint="run `fcvm setup uffd-preload`")
    # The server's socket sits in the snapshot's owner-only directory, and /dev/userfaultfd is root's: fcvm
    # connects and opens them, and the library in QEMU uses what QEMU inherits. The page server therefore sees
    # QEMU's launcher as its client, as it sees Firecracker (or fc-mock), the process that owns the VM.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        try:
            server.connect(str(restore.uffd_socket))
        except OSError as exc:
            raise QemuError(f"cannot reach the page server at {restore.uffd_socket}: {exc.strerror or exc}",
                            hint="is `fcvm snapshot serve` running?") from None
        connection = handover.keep(server.detach())
    device = None
    with contextlib.suppress(OSError):  # not ours to open: the library tries the syscall itself
        device = handover.keep(os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC))
    return preload.env_for(connection, spec.mem_mib << 20, restore.preload, program=Path(qemu_binary()).name,
                           device_fd=device)


def unprivileged(uid: int, *, use_kvm: bool) -> list[str]:
    """argv prefix that execs the rest as `uid` (and gid) with no capabilities, none inheritable and none to
    regain (an empty bounding set, no_new_privs), so QEMU never holds root. With KVM it keeps the one group that
    may open /dev/kvm."""
    setpriv = host.which("setpriv")
    if setpriv is None:
        raise QemuError("setpriv is not installed, so QEMU cannot run as a uid of its own",
                        hint="apt-get install util-linux")
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", *(_kvm_groups() if use_kvm else ["--clear-groups"]),
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def _kvm_groups() -> list[str]:
    device = os.stat("/dev/kvm")
    if device.st_mode & 0o006 == 0o006:
        return ["--clear-groups"]
    if device.st_gid != 0 and device.st_mode & 0o060 == 0o060:  # udev's `kvm` group, mode 0660
        return [f"--groups={device.st_gid}"]
    raise QemuError(f"QEMU runs as a uid of its own, and /dev/kvm (mode {stat.S_IMODE(device.st_mode):o}) is "
                    "root's alone", hint="give /dev/kvm to group kvm with mode 0660, as udev does")


# POSIX ACLs, as the kernel stores them in an xattr: a version, then (tag, permissions, id) entries.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _acl(fd: int) -> list[tuple[int, int, int]]:
    """The file's access ACL; its mode's three entries when it has none."""
    try:
        data = os.getxattr(fd, _ACL_XATTR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        mode = os.fstat(fd).st_mode
        return [(_USER_OBJ, mode >> 6 & 7, _NO_ID), (_GROUP_OBJ, mode >> 3 & 7, _NO_ID), (_OTHER, mode & 7, _NO_ID)]
    return list(_ACL_ENTRY.iter_unpack(data[_ACL_VERSION.size:]))


def _set_grant(fd: int, uid: int, permissions: int | None) -> None:
    """Give `uid` `permissions` on the file, or take its grant away (None), keeping every other entry. Without
    named entries the ACL is just the mode again, and the kernel stores it as the mode."""
    fcntl.flock(fd, fcntl.LOCK_EX)  # clones of one snapshot start at once; each edit reads and writes the ACL
    try:
        entries = [e for e in _acl(fd) if e[0] != _MASK and (e[0], e[2]) != (_USER, uid)]
        if permissions is not None:
            entries.append((_USER, permissions, uid))
        if any(tag in (_USER, _GROUP) for tag, _, _ in entries):
            mask = 0
            for tag, allowed, _ in entries:
                mask |= allowed if tag in (_USER, _GROUP, _GROUP_OBJ) else 0
            entries.append((_MASK, mask, _NO_ID))
        entries.sort(key=lambda e: (e[0], e[2]))
        os.setxattr(fd, _ACL_XATTR, _ACL_VERSION.pack(2) + b"".join(_ACL_ENTRY.pack(*e) for e in entries))
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def lent(path: Path, uid: int) -> Iterator[None]:
    """`uid` may open `path` read-write while the block runs.

    A File clone's QEMU must open the snapshot's memory file read-write once (QEMU 7.2, above), and the file is
    its owner's alone. So its uid gets that right until QEMU has it open, never a path: the snapshot's directory
    stays owner-only and QEMU reopens an inherited fd. A grant that a SIGKILL left behind names a uid that has
    no path to the file either."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _set_grant(fd, uid, 0o6)
        except OSError as exc:
            raise QemuError(f"cannot let the clone's QEMU (uid {uid}) open {path}: {exc.strerror}",
                            hint="the snapshot's filesystem needs POSIX ACLs") from None
        try:
            yield
        finally:
            _set_grant(fd, uid, None)
    finally:
        os.close(fd)


class QemuVm:
    def __init__(self, spec: MachineSpec, *, use_kvm: bool | None = None, own_session: bool = True) -> None:
        """`own_session=False` keeps QEMU in its parent's process group (fc-mock's): whoever kills that group
        takes the guest along, as a guest dies with a real Firecracker process."""
        self.spec = spec
        self.use_kvm = host.kvm_status().usable if use_kvm is None else use_kvm
        self.name = "qemu"
        self._log = log.get(f"vm.{spec.name}")
        self._own_session = own_session
        self._vmm: VmmProcess | None = None
        self._bridge: Any = None
        self.version = ""  # QEMU's, read over QMP on a restore
        self.marks: dict[str, float] = {}

    @property
    def process(self) -> ProcessRef:
        ref = self._vmm.ref if self._vmm is not None else None
        if ref is None:
            raise QemuError("QEMU has not been started")
        return ref

    def start(self) -> None:
        """Launch QEMU; return once it has opened everything (a restore: once the guest runs again)."""
        spec = self.spec
        with contextlib.ExitStack() as lending:
            self._launch(lending)
            with self._monitor() as qmp:
                lending.close()  # QMP greets only once QEMU has opened its RAM
                if spec.restore is not None:
                    self._restore(qmp, spec.restore)
        if spec.vsock_uds:
            self._start_bridge()

    def _launch(self, lending: contextlib.ExitStack) -> None:
        spec = self.spec
        handover = Handover()
        try:
            argv = build_argv(spec, use_kvm=self.use_kvm, handover=handover)
            env = _preload_env(spec, handover)
            prefix = []
            if spec.vmm_uid is not None:
                prefix = unprivileged(spec.vmm_uid, use_kvm=self.use_kvm)
                if spec.restore is not None and spec.restore.backend == MemBackend.FILE:
                    lending.enter_context(lent(spec.restore.memory, spec.vmm_uid))
            # Its own session: a terminal's Ctrl-C reaches fcvm, which stops the container first, not QEMU.
            self._vmm = VmmProcess(
                [*spec.enter_argv, *prefix, *argv], console=spec.console_log, logger=self._log,
                own_group=self._own_session, env=env, pass_fds=handover.fds,
            )
            self._vmm.start()
        finally:
            handover.close()  # QEMU holds its own copies

    @contextlib.contextmanager
    def _monitor(self) -> Iterator[Qmp]:
        """QMP, once QEMU is up: its greeting comes only after QEMU has set the machine up. A QEMU that failed
        first (the socket was fcvm's, so the connection went through) is reported with its last lines."""
        vmm = self._vmm
        assert vmm is not None
        with contextlib.ExitStack() as stack:
            try:
                qmp = stack.enter_context(Qmp(qmp_socket(self.spec)))
            except QemuError:
                if wait_until(vmm.exited, 2, interval=0.01):
                    raise QemuError(f"QEMU exited during start-up: {vmm.output()}") from None
                raise
            yield qmp

    def _restore(self, qmp: Qmp, restore: RestoreSpec) -> None:
        """Load the device state into the stopped machine, check where its RAM comes from, and run it."""
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
            assert self._vmm is not None
            raise QemuError(f"the snapshot did not load (QEMU status {status}): {self._vmm.output()}")
        self.marks["loaded"] = time.monotonic()
        qmp.cmd("cont")
        self.marks["resumed"] = time.monotonic()

    def _check_page_server(self) -> None:
        """Fail closed: a clone whose RAM is not served by the page server would run on zero-filled memory."""
        from fcvm.uffd import preload

        if not preload.verify_client(self.process.pid):
            raise QemuError("QEMU's guest RAM is not registered with the page server (no userfaultfd in QEMU); "
                            "refusing to run the clone on empty memory")

    def _start_bridge(self) -> None:
        from fcvm.channel import SerialVsockBridge

        assert self.spec.vsock_uds is not None
        self._bridge = SerialVsockBridge(serial_socket(self.spec), self.spec.vsock_uds)
        self._bridge.start()

    def _qmp(self, command: str, **arguments: Any) -> Any:
        with Qmp(qmp_socket(self.spec), timeout=10) as qmp:
            return qmp.cmd(command, **arguments)

    def wait(self, timeout: float | None = None) -> int | None:
        return self._vmm.wait(timeout) if self._vmm is not None else None

    def pause(self) -> None:
        self._qmp("stop")

    def resume(self) -> None:
        self._qmp("cont")

    def stop(self, timeout: float = 10.0) -> None:
        if self._vmm is not None:
            if not self._vmm.exited():
                with contextlib.suppress(QemuError):
                    self._qmp("quit")
                self._vmm.wait(timeout)
            self._vmm.stop()
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
