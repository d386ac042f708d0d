"""The long-running `vm` process: builds one microVM, supervises it, and tears everything down.

Everything it creates on the host is journaled first, so a SIGKILL at any point leaves a journal that
`fcvm gc` (or any `fcvm ls`) replays.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fcvm import cleanup, host
from fcvm.core import log, paths
from fcvm.core.errors import FcvmError, UsageError
from fcvm.core.proc import ProcessRef
from fcvm.state import Store, VmRecord
from fcvm.state.journal import Journal
from fcvm.vmm.base import Drive, Hypervisor, MachineSpec
from fcvm_wire import ports as wire_ports
from fcvm_wire.control import ControlError, ControlStream
from fcvm_wire.plan import ImageSpec, NetworkSpec, Plan, VolumeSpec

if TYPE_CHECKING:
    from fcvm.network import VmNetwork
    from fcvm.network.ports import PortMapping
    from fcvm.vmm.firecracker.jail import Jail

_log = log.get("supervisor")


@dataclass(frozen=True)
class VolumeMap:
    host_dir: Path
    guest_path: str
    read_only: bool

    @classmethod
    def parse(cls, spec: str) -> VolumeMap:
        parts = spec.split(":")
        read_only = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            read_only = parts.pop() == "ro"
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UsageError(f"--map {spec!r} must be HOSTDIR:GUESTDIR[:ro]")
        host_dir = Path(parts[0]).expanduser().resolve()
        if not host_dir.is_dir():
            raise UsageError(f"--map {spec!r}: {host_dir} is not a directory")
        if not parts[1].startswith("/"):
            raise UsageError(f"--map {spec!r}: the guest path must be absolute")
        return cls(host_dir, parts[1], read_only)


@dataclass
class RunRequest:
    image: str
    name: str
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    publish: list[PortMapping] = field(default_factory=list)
    maps: list[VolumeMap] = field(default_factory=list)
    network: str = "bridged"
    hypervisor: str = "qemu"
    firecracker_bin: Path | None = None
    jailer: Path | None = None  # the jailer binary, when Firecracker runs jailed
    cpus: int = 2
    mem_mib: int = 1024
    health_url: str | None = None
    user: str = ""
    workdir: str = ""
    kernel: Path | None = None
    initrd: Path | None = None
    remove: bool = False
    boot_timeout: float = 300.0  # until the container runs; TCG guests are slow, but never wait forever
    echo_output: bool = True  # foreground: container stdout/stderr go to ours


class VmSupervisor:
    def __init__(self, request: RunRequest, store: Store | None = None) -> None:
        self.request = request
        self.store = store or Store()
        self.vm: VmRecord | None = None
        self.journal: Journal | None = None
        self.hypervisor: Hypervisor | None = None
        self.network: VmNetwork | None = None
        self.jail: Jail | None = None
        self._stop = threading.Event()
        self._stop_reason = ""
        self._booted = False
        self._control: ControlStream | None = None
        self._container_done = threading.Event()
        self._t0 = time.monotonic()
        self._timings: dict[str, float] = {}
        self._exit_code: int | None = None
        self._agent_failed: str | None = None
        self._container_log: IO[str] | None = None
        self._listeners: list[socket.socket] = []
        self._volume_servers: list[Any] = []
        self._log = log.get(f"vm.{request.name}")

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self) -> int:
        """Build, boot and supervise the VM until it exits or we are told to stop; always clean up."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._create()
            self._supervise()
        finally:
            self._teardown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._agent_failed:
            raise FcvmError(f"VM {self.request.name}: {self._agent_failed}",
                            hint=f"the guest console is in {self.log_dir / 'console.log'}")
        if self._exit_code is not None:
            return self._exit_code
        return {"SIGINT": 130, "SIGTERM": 143}.get(self._stop_reason, 1)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_reason = signal.Signals(signum).name
        self._stop.set()

    @property
    def workdir(self) -> Path:
        assert self.vm is not None
        return paths.vm_dir(self.vm.id)

    @property
    def log_dir(self) -> Path:
        assert self.vm is not None
        return paths.vm_logs_dir(self.vm.id)

    def _create(self) -> None:
        request = self.request
        cleanup.reap_stale(self.store)  # a dead owner's row must not hold the name
        self.vm = self.store.create_vm(
            request.name, kind="vm", image=request.image, hypervisor=request.hypervisor,
            process=ProcessRef.self(),
            config={"cmd": request.cmd, "env_keys": sorted(request.env), "cpus": request.cpus,
                    "mem_mib": request.mem_mib, "maps": [m.guest_path for m in request.maps],
                    "health_url": request.health_url},
        )
        self.journal = Journal(self.store, self.vm.id)
        kernel, initrd, rootfs = self._assets()
        self.journal.record("dir", path=str(self.workdir))
        paths.ensure_dir(self.workdir, 0o700)
        paths.ensure_dir(self.log_dir, 0o700)
        self._container_log = open(self.log_dir / "container.log", "a", buffering=1)  # noqa: SIM115

        from fcvm.storage.disks import make_vm_disk
        from fcvm.storage.images import export_image

        image_disk = export_image(request.image)
        disk = make_vm_disk(rootfs, self.workdir)
        drives = [Drive("rootfs", disk, root=True)]
        if image_disk:
            drives.append(Drive("image", image_disk.path, read_only=True))

        from fcvm.network import setup_network

        jail_uid = self._allocate_jail_uid() if request.jailer else None  # first: the TAP is created for it
        network = self.network = setup_network(request.network, store=self.store, journal=self.journal,
                                               vm_id=self.vm.id, ports=request.publish, tap_uid=jail_uid)
        self.store.update_vm(self.vm.id, network=network.to_json(),
                             ports=[m.to_json() for m in request.publish])

        if jail_uid is not None:
            self.jail = self._jail(network, jail_uid)
            kernel, initrd = self._admit(kernel), initrd and self._admit(initrd)
            drives = [replace(d, path=self._admit(d.path, writable=not d.read_only)) for d in drives]
        vsock_uds = (self.jail.root if self.jail else self.workdir) / "v.sock"
        jail_info = {"jail": {"root": str(self.jail.root), "uid": self.jail.uid}} if self.jail else {}
        self.store.update_vm(self.vm.id, config={**self.vm.config, "vsock_uds": str(vsock_uds), **jail_info})
        plan = Plan(
            name=request.name,
            image=ImageSpec(ref=request.image, disk="/dev/vdb" if image_disk else "",
                            archive_size=image_disk.archive_size if image_disk else 0),
            network=NetworkSpec(**network.guest_spec()),
            cmd=request.cmd, env=request.env, user=request.user, workdir=request.workdir,
            volumes=[VolumeSpec(m.guest_path, wire_ports.HOST_VOLUME_BASE + i, m.read_only)
                     for i, m in enumerate(request.maps)],
            hostname=request.name,
        )
        plan.validate()
        self._listen_control(vsock_uds, plan)
        self._serve_volumes(vsock_uds)

        spec = MachineSpec(
            name=request.name, workdir=self.workdir, kernel=kernel, initrd=initrd,
            boot_args="", vcpus=request.cpus, mem_mib=request.mem_mib, drives=drives,
            tap=network.tap, guest_mac=network.guest_spec()["mac"], vsock_uds=vsock_uds,
            guest_cid=wire_ports.GUEST_CID, enter_argv=network.enter_argv(), log_dir=self.log_dir,
        )
        self.hypervisor = self._hypervisor(spec, plan)
        self._start_hypervisor()

    def _assets(self) -> tuple[Path, Path | None, Path]:
        from fcvm.guest import find_kernel, find_rootfs

        request = self.request
        built = find_kernel(refresh_initramfs=True)
        rootfs = find_rootfs()
        if rootfs is None:
            raise FcvmError("the guest rootfs is not built", hint="run `fcvm setup rootfs`")
        if request.kernel:
            if not request.kernel.is_file():
                raise UsageError(f"--kernel {request.kernel} does not exist")
            kernel = request.kernel
        elif built is None:
            raise FcvmError("the guest kernel is not built", hint="run `fcvm setup kernel`")
        else:
            kernel = built.vmlinux if request.hypervisor == "firecracker" else built.bzimage
        initrd = request.initrd or (built.initramfs if built else None)
        if initrd is not None and not initrd.is_file():
            raise UsageError(f"--initrd {initrd} does not exist")
        return kernel, initrd, rootfs

    def _allocate_jail_uid(self) -> int:
        """A uid (and gid) for this VM's jailed Firecracker alone: no two VMMs share an identity."""
        from fcvm.vmm.firecracker.jail import JAIL_UID_BASE, JAIL_UID_COUNT

        assert self.vm is not None
        candidates = (str(JAIL_UID_BASE + i) for i in range(JAIL_UID_COUNT))
        return int(self.store.allocate("jail_uid", self.vm.id, candidates))

    def _jail(self, network: VmNetwork, uid: int) -> Jail:
        """The jail's root, owned by the VM's uid, and the cgroup the jailed VMM joins; both journaled first."""
        from fcvm.network.base import NETNS_DIR
        from fcvm.vmm.firecracker.jail import Jail

        request = self.request
        assert self.vm is not None and self.journal is not None
        assert request.jailer is not None and request.firecracker_bin is not None
        jail = Jail(jailer=request.jailer, exec_file=request.firecracker_bin, id=self.vm.id, uid=uid, gid=uid,
                    base=paths.data_dir() / "jail", netns=NETNS_DIR / network.netns)
        cgroup = jail.cgroup_dir()
        if cgroup is not None:
            self.journal.record("cgroup", path=str(cgroup))
        self.journal.record("dir", path=str(jail.dir))
        jail.create()
        return jail

    def _admit(self, path: Path, *, writable: bool = False) -> Path:
        """`path` made visible in the jail: a hard link (the jail is on the data dir's filesystem). The VM's own
        writable disk is given to the jail uid; a shared asset the jail uid could not read is copied, never
        re-owned, so other VMs keep theirs."""
        from fcvm.storage.btrfs import clone_file

        assert self.jail is not None
        target = self.jail.root / path.name
        private = writable or not path.stat().st_mode & stat.S_IROTH
        if private and not writable:
            clone_file(path, target)
        else:
            try:
                os.link(path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                clone_file(path, target)
        if private:
            os.chown(target, self.jail.uid, self.jail.gid)
        return target

    def _hypervisor(self, spec: MachineSpec, plan: Plan) -> Hypervisor:
        from fcvm.guest import qemu_boot_args

        if self.request.hypervisor == "firecracker":
            from fcvm.vmm.firecracker import FirecrackerVm

            assert self.request.firecracker_bin is not None
            assert self.network is not None
            guest = self.network.guest_spec()
            # MMDS needs a source address before the plan (which carries the address) can be read.
            spec.boot_args = (f"{qemu_boot_args()} fcvm_plan=mmds "
                              f"fcvm_net={guest['address']}/{guest['prefix']},{guest['gateway']}")
            return FirecrackerVm(spec, binary=self.request.firecracker_bin,
                                 mmds=json.loads(plan.to_json()), jail=self.jail)
        from fcvm.vmm.qemu import QemuVm

        spec.boot_args = f"{qemu_boot_args()} fcvm_plan=channel"
        return QemuVm(spec)

    def _mark(self, stage: str) -> None:
        """Seconds since `fcvm podman run` began, per stage, kept in the row for `fcvm inspect` and bench/."""
        if stage in self._timings or self.vm is None:
            return
        self._timings[stage] = round(time.monotonic() - self._t0, 3)
        current = self.store.get_vm(self.vm.id)
        if current is not None:
            self.store.update_vm(self.vm.id, config={**current.config, "timings": self._timings})

    def _start_hypervisor(self) -> None:
        assert self.hypervisor is not None and self.journal is not None and self.vm is not None
        self._mark("vmm_starting")
        self.hypervisor.start()  # for Firecracker this returns once InstanceStart was sent
        self._mark("vmm_started")
        self._booted = True
        vmm = self.hypervisor.process
        self.journal.record("process", pid=vmm.pid, start=vmm.start, grace=5, group=True)
        self.store.update_vm(self.vm.id, status="running", started=time.time(), health="starting",
                             hypervisor=self.hypervisor.name)
        self._log.info("%s started (pid %d)", self.hypervisor.name, vmm.pid)

    # --- the agent's control stream --------------------------------------------------------------

    def _listen(self, path: Path) -> socket.socket:
        assert self.journal is not None
        self.journal.record("socket", path=str(path))
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        if self.jail is not None:  # the jailed Firecracker connects here for guest-initiated vsock streams
            os.chown(path, self.jail.uid, self.jail.gid)
        listener.listen(16)
        self._listeners.append(listener)
        return listener

    def _spawn(self, target: Any, *args: Any) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    def _listen_control(self, vsock_uds: Path, plan: Plan) -> None:
        listener = self._listen(Path(f"{vsock_uds}_{wire_ports.HOST_CONTROL}"))

        def accept_loop() -> None:
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                self._spawn(self._control_session, ControlStream(conn), plan)

        self._spawn(accept_loop)

    def _control_session(self, control: ControlStream, plan: Plan) -> None:
        assert self.vm is not None
        self._control = control
        try:
            for message in control:
                kind = message["type"]
                if kind == "hello":
                    self._mark("agent_connected")
                    if self.request.hypervisor != "firecracker":
                        control.send({"type": "plan", "plan": json.loads(plan.to_json())})
                elif kind == "log":
                    self._on_log(message.get("stream", "agent"), str(message.get("line", "")))
                elif kind == "status":
                    self._on_status(message)
                elif kind == "health" and not self.request.health_url:
                    self._set_health(str(message.get("health")))
        except (ControlError, OSError) as exc:
            self._log.warning("agent control stream: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                control.close()

    def _on_log(self, stream: str, line: str) -> None:
        if stream == "agent":
            self._log.info("agent: %s", line)
            return
        assert self._container_log is not None
        self._container_log.write(line + "\n")
        if self.request.echo_output:
            print(line, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)

    def _set_health(self, health: str) -> None:
        assert self.vm is not None
        if health == "healthy":
            self._mark("healthy")
        self.store.update_vm(self.vm.id, health=health)

    def _on_status(self, message: dict[str, Any]) -> None:
        assert self.vm is not None
        state = message.get("state")
        self._log.debug("agent status %s", message)
        if state == "running":
            self._mark("container_running")
        if state == "running" and self.request.health_url:
            self._spawn(self._poll_health)
        elif state == "exited":
            self._exit_code = int(message.get("exit_code", 1))
            self._log.info("container exited with code %d", self._exit_code)
            self._container_done.set()
            self._stop.set()
        elif state == "failed":
            self._agent_failed = str(message.get("detail", "the guest agent failed"))
            self._container_done.set()
            self._stop.set()

    # --- volumes ---------------------------------------------------------------------------------

    def _serve_volumes(self, vsock_uds: Path) -> None:
        """One fuse-pipe server per --map on `<vsock uds>_<5000+i>`; the guest relay reconnects to the same
        server (and session) after a channel reset."""
        if not self.request.maps:
            return
        from fcvm.fusepipe import Server

        for index, volume in enumerate(self.request.maps):
            listener = self._listen(Path(f"{vsock_uds}_{wire_ports.HOST_VOLUME_BASE + index}"))
            server = Server(str(volume.host_dir), read_only=volume.read_only)
            self._volume_servers.append(server)
            self._spawn(server.serve_forever, listener)

    # --- health ----------------------------------------------------------------------------------

    def _poll_health(self) -> None:
        """Poll the health URL through the published port that maps to the URL's port."""
        assert self.vm is not None and self.request.health_url
        url = urllib.parse.urlsplit(self.request.health_url)
        guest_port = url.port or (443 if url.scheme == "https" else 80)
        assert self.network is not None
        endpoint = next(((ip, port) for ip, port, mapping in self.network.published()
                         if mapping.guest_port == guest_port and mapping.protocol == "tcp"), None)
        if endpoint is None:
            self._log.warning("--health-check port %d is not published; health stays unknown", guest_port)
            return
        target = url._replace(netloc=f"{endpoint[0]}:{endpoint[1]}").geturl()
        last = None
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(target, timeout=2) as response:
                    health = "healthy" if 200 <= response.status < 400 else "unhealthy"
            except urllib.error.HTTPError:  # the server answered, with an error status
                health = "unhealthy"
            except OSError:  # nothing answers yet: still starting, unless it was up before
                health = "starting" if last in (None, "starting") else "unhealthy"
            if health != last:
                self._set_health(health)
                self._log.info("health: %s", health)
                last = health
            self._stop.wait(1.0)

    # --- supervision and teardown ----------------------------------------------------------------

    def _supervise(self) -> None:
        assert self.hypervisor is not None
        deadline = time.monotonic() + self.request.boot_timeout
        while not self._stop.is_set():
            if "container_running" not in self._timings and time.monotonic() > deadline:
                self._agent_failed = (f"the container did not start within {self.request.boot_timeout:.0f} s "
                                      "(--boot-timeout); the guest may be stuck")
                return
            code = self.hypervisor.wait(0.2)
            if code is not None:
                if self._exit_code is None and not self._agent_failed:
                    self._agent_failed = f"the VM exited unexpectedly (hypervisor exit code {code})"
                return
        if self._stop_reason and not self._container_done.is_set():
            self._stop_container()

    def _stop_container(self, grace: float = 10.0) -> None:
        """Like `podman stop`: the agent sends the container SIGTERM, then SIGKILL after its timeout; we wait
        for its exit code so the row records it."""
        control = self._control
        if control is None:
            return
        self._log.info("stopping the container (%s)", self._stop_reason)
        try:
            control.send({"type": "shutdown", "timeout": int(grace)})
        except OSError:
            return
        self._container_done.wait(grace + 5)

    def _teardown(self) -> None:
        self._stop.set()
        if self.hypervisor is not None:
            try:
                self.hypervisor.stop(timeout=5)
            except Exception as exc:  # teardown goes on: the journal still stops the VMM process
                self._log.warning("stopping the hypervisor: %s", exc)
        for server in self._volume_servers:
            server.close()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        if self._container_log is not None:
            self._container_log.close()
        if self.vm is None:
            return
        failures = cleanup.finish_vm(self.store, self.vm, exit_code=self._exit_code)
        for failure in failures:
            self._log.error("left behind (run `fcvm gc`): %s", failure)
        # A VM that never booted leaves no row behind, like a failed `podman run` that created nothing.
        if self.request.remove or not self._booted:
            self.store.delete_vm(self.vm.id)
            if not self._agent_failed:  # keep the console of a failed boot for the error message's hint
                shutil.rmtree(self.log_dir, ignore_errors=True)


def generate_name() -> str:
    return f"vm-{secrets.token_hex(3)}"


def choose_hypervisor(requested: str, firecracker_bin: str | None) -> tuple[str, Path | None]:
    """`auto` is Firecracker when it can really boot a guest here, else QEMU."""
    from fcvm.vmm.firecracker import find_firecracker

    if requested not in ("auto", "qemu", "firecracker"):
        raise UsageError(f"unknown --hypervisor {requested!r}: use firecracker, qemu or auto")
    binary = find_firecracker(firecracker_bin)
    if requested == "firecracker":
        if binary is None:
            raise FcvmError("no firecracker binary found",
                            hint="fcvm setup firecracker, --firecracker-bin, or FCVM_FIRECRACKER_BIN")
        return "firecracker", binary
    if requested == "auto" and binary is not None and host.kvm_status().usable:
        return "firecracker", binary
    from fcvm.vmm.qemu import qemu_binary

    qemu_binary()  # a clear error if QEMU is missing too
    return "qemu", None


def env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            raise UsageError(f"-e {pair!r} must be KEY=VALUE")
        env[key] = value if sep else os.environ.get(key, "")
    return env
