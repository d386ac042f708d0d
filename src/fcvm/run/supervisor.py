"""The long-running process behind `fcvm podman run`: create -> supervise -> teardown of one microVM.

Everything it creates on the host is journaled first, so a SIGKILL at any point leaves a journal that
`fcvm gc` (or any `fcvm ls`) replays.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fcvm.core import log, paths
from fcvm.core.bounded_log import BoundedLog
from fcvm.core.errors import FcvmError, UsageError
from fcvm.core.kinds import Health, NetworkMode, RowKind, VmmKind, VmStatus
from fcvm.core.proc import ProcessRef
from fcvm.run import cleanup
from fcvm.run.agent_gate import AgentGate, deliver_credential
from fcvm.run.agent_link import (
    DEFAULT_STOP_GRACE,
    AgentLink,
    poll_health,
    published_health_target,
    start_thread,
)
from fcvm.run.container_log import CONTAINER_LOG
from fcvm.run.request import SUPERVISOR_LOG, RunRequest, VolumeMap
from fcvm.snapshot.cache import CacheLevel, RunShape
from fcvm.state import Store, VmRecord
from fcvm.state.journal import Journal
from fcvm.vmm.base import Drive, Hypervisor, MachineSpec, MemBackend
from fcvm_wire import credential as credential_wire
from fcvm_wire import ports as wire_ports
from fcvm_wire.plan import ImageSpec, NetworkSpec, Plan, VolumeSpec

if TYPE_CHECKING:
    from fcvm.network import VmNetwork
    from fcvm.snapshot.restore import OpenSnapshot
    from fcvm.vmm.firecracker.jail import Jail


RESTORE_TIMEOUT = 60.0  # a guest restored from a good snapshot answers in about a second, even under TCG
PRESTART_NAME = "prestart"  # the name in a prepare plan: nothing of the run may reach the guest before its plan


class RestoreFailed(FcvmError):
    """The VM could not be restored from its snapshot; nothing of it is left."""


class VmSupervisor:
    def __init__(self, request: RunRequest, store: Store | None = None, *, vm_id: str | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.request = request
        self._on_ready = on_ready  # called once, when the VM runs and is no longer starting (`-d` returns then)
        self.vm_id = vm_id
        self.store = store or Store()
        self.vm: VmRecord | None = None
        self.journal: Journal | None = None
        self.hypervisor: Hypervisor | None = None
        self.network: VmNetwork | None = None
        self.jail: Jail | None = None
        self.agent: AgentLink | None = None
        self._stop = threading.Event()
        self._entry_lock = threading.Lock()  # held while a cache entry is taken
        self._stop_reason = ""
        self._booted = False
        self._t0 = time.monotonic()
        self._timings: dict[str, float] = {"t0_wall": time.time()}  # the stages below are seconds after this
        self._failure: str | None = None
        self._cache_shape: RunShape | None = None  # a cold run that leaves cache entries behind
        self._stand_ins: list[tuple[int, Path]] = []  # journal entry, path: removed once the VM runs
        self._container_log: BoundedLog | None = None
        self._credential = b""  # what the agent proves itself with (fcvm_wire.credential)
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
        except FcvmError as exc:
            if self._restoring_failed():
                raise RestoreFailed(str(exc)) from exc
            raise
        finally:
            self._teardown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        failure = self._failure or (self.agent.failure if self.agent else None)
        if failure and self._restoring_failed():
            raise RestoreFailed(failure)
        if failure:
            raise FcvmError(f"VM {self.request.name}: {failure}",
                            hint=f"the guest console is in {self.log_dir / 'console.log'}")
        if self.agent is not None and self.agent.exit_code is not None:
            return self.agent.exit_code
        return {"SIGINT": 130, "SIGTERM": 143}.get(self._stop_reason, 1)

    def _restoring_failed(self) -> bool:
        """A restore that never reached the agent: the snapshot (or cache entry) is at fault, not the run."""
        return self.request.snapshot is not None and "restored" not in self._timings and not self._stop_reason

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
        snapshot = self._open_snapshot() if request.snapshot else None  # checked before anything is created
        image = snapshot.description.image if snapshot else request.image
        self.vm = self.store.create_vm(
            request.name, kind=RowKind.CLONE if snapshot and not request.warm else RowKind.VM, image=image,
            hypervisor=request.hypervisor, process=ProcessRef.self(), vm_id=self.vm_id, serve_id=request.serve_id,
            config={"cmd": list(snapshot.description.cmd if snapshot else request.cmd),
                    "env_keys": sorted(request.env), "cpus": request.cpus, "mem_mib": request.mem_mib,
                    "maps": [m.guest_path for m in request.maps], "health_url": request.health_url,
                    **({"snapshot": request.snapshot, "memory": request.memory} if snapshot else {}),
                    "start": {"from": request.warm or ("clone" if snapshot else "cold"),
                              **({"entry": request.snapshot} if request.warm else {})}},
        )
        self.journal = Journal(self.store, self.vm.id)
        self.journal.record("dir", path=str(self.workdir))
        paths.ensure_dir(self.workdir, 0o700)
        paths.ensure_dir(self.log_dir, 0o700)
        # What the container prints may be secret: its logs are the owner's alone (the VMM appends to console.log).
        paths.make_private(self.log_dir / paths.CONSOLE_LOG)
        self._container_log = BoundedLog(self.log_dir / CONTAINER_LOG)  # created 0600
        # A clone's agent already holds its source's credential; a cold boot's gets a new one.
        self._credential = (credential_wire.from_hex(snapshot.description.agent_credential) if snapshot
                            else secrets.token_bytes(credential_wire.CREDENTIAL_SIZE))

        if snapshot is not None:
            kernel, initrd, drives, maps = self._clone_disks(snapshot)
            image_disk = None
            if request.warm == CacheLevel.PRESTART:  # its own run: once healthy, a startup entry for its config
                from fcvm.run.warm import run_shape

                self._cache_shape = run_shape(request)
        else:
            from fcvm.run.warm import run_shape

            self._cache_shape = run_shape(request) if self.vm.kind == RowKind.VM else None
            kernel, initrd, rootfs = self._assets()
            from fcvm.storage.disks import make_vm_disk
            from fcvm.storage.images import export_image

            image_disk = export_image(request.image)
            disk = make_vm_disk(rootfs, self.workdir)
            drives = [Drive("rootfs", disk, root=True)]
            if image_disk:
                drives.append(Drive("image", image_disk.path, read_only=True))
            maps = request.maps

        from fcvm.network import setup_network

        # First: the TAP is created for it. Bridged QEMU runs as a uid of its own, as jailed Firecracker does.
        jail_uid = self._allocate_uid("jail_uid") if request.jailer else None
        vmm_uid = (self._allocate_uid("vmm_uid")
                   if request.hypervisor == VmmKind.QEMU and request.network == NetworkMode.BRIDGED else None)
        network = self.network = setup_network(request.network, store=self.store, journal=self.journal,
                                               vm_id=self.vm.id, ports=list(request.publish),
                                               tap_uid=jail_uid if jail_uid is not None else vmm_uid,
                                               host_loopback=request.allow_host_loopback)
        self.store.update_vm(self.vm.id, network=network.to_json(),
                             ports=[m.to_json() for m in request.publish])

        if jail_uid is not None:
            jail = self.jail = self._jail(network, jail_uid)
            kernel, initrd = jail.admit(kernel), initrd and jail.admit(initrd)
            drives = [replace(d, path=jail.admit(d.path, writable=not d.read_only)) for d in drives]
        vsock_uds = (self.jail.root if self.jail else self.workdir) / "v.sock"
        plan = Plan(
            name=request.name,
            image=ImageSpec(ref=request.image, disk="/dev/vdb" if image_disk else "",
                            archive_size=image_disk.archive_size if image_disk else 0),
            network=NetworkSpec(**network.guest_spec()),
            cmd=list(request.cmd), env=request.env, user=request.user, workdir=request.workdir,
            volumes=[VolumeSpec(m.guest_path, wire_ports.HOST_VOLUME_BASE + i, m.read_only)
                     for i, m in enumerate(maps)],
            hostname=request.name,
        )
        plan.validate()
        # What the agent needs before anything of the run: the same for every run of the image, so a pre-start
        # snapshot taken once it is prepared holds nothing of this run.
        prepare = replace(plan, name=PRESTART_NAME, cmd=[], env={}, user="", workdir="", volumes=[], hostname="")
        firecracker = request.hypervisor == VmmKind.FIRECRACKER
        restoring_before_the_run = snapshot is not None and request.warm == CacheLevel.PRESTART
        self.agent = AgentLink(
            plan=plan if snapshot is None or restoring_before_the_run else None,
            prepare=prepare if snapshot is None and not firecracker else None,
            restored=snapshot is not None, credential=self._credential, container_log=self._container_log,
            echo_output=request.echo_output, agent_reports_health=not request.health_url,
            on_stage=self._on_stage, on_health=self._set_health, logger=self._log,
            on_prepared=self._on_prepared,
        )
        self.agent.accept_forever(self._listen(Path(f"{vsock_uds}_{wire_ports.HOST_CONTROL}")), self._stop)
        self._serve_volumes(vsock_uds, maps)

        spec = MachineSpec(
            name=request.name, workdir=self.workdir, kernel=kernel, initrd=initrd,
            boot_args="", vcpus=request.cpus, mem_mib=request.mem_mib, drives=drives,
            tap=network.tap, guest_mac=network.guest_spec()["mac"], vsock_uds=vsock_uds,
            guest_cid=wire_ports.GUEST_CID, enter_argv=network.enter_argv(), log_dir=self.log_dir,
            mem_file=self._memory_file(snapshot),
            restore=snapshot.restore_spec(request, self.workdir) if snapshot else None, vmm_uid=vmm_uid,
        )
        self.hypervisor = self._hypervisor(spec, prepare)
        jail_info = {"jail": {"root": str(self.jail.root), "uid": self.jail.uid}} if self.jail else {}
        self.store.update_config(self.vm.id, vsock_uds=str(vsock_uds), **jail_info,
                                 **({"vmm_uid": vmm_uid} if vmm_uid is not None else {}),
                                 machine=self._machine_record(spec, maps))
        self._start_hypervisor()
        if snapshot is None:  # a restored agent holds its credential already
            start_thread(deliver_credential, vsock_uds, self._credential, self._stop, request.boot_timeout, self._log)

    def _open_snapshot(self) -> OpenSnapshot:
        from fcvm.snapshot.restore import open_snapshot

        assert self.request.snapshot is not None
        return open_snapshot(self.store, self.request)

    def _memory_file(self, snapshot: OpenSnapshot | None) -> Path | None:
        """QEMU's RAM in a shared file of the VM's own, so the VM can be snapshotted: a booted VM's, or a clone's
        reflink of the snapshot's memory when the request asks for it (it then shares no pages with other clones)."""
        request = self.request
        if request.hypervisor != VmmKind.QEMU or (snapshot is not None and not (
                request.snapshottable and request.memory == MemBackend.FILE)):
            return None
        mem_file = self.workdir / "mem"
        if snapshot is not None:
            from fcvm.snapshot.create import snapshot_files
            from fcvm.storage.btrfs import clone_file

            clone_file(snapshot_files(snapshot.directory)[1], mem_file)
        return mem_file

    def _clone_disks(self, snapshot: OpenSnapshot) -> tuple[Path, Path | None, list[Drive], tuple[VolumeMap, ...]]:
        """The clone's own reflink of every frozen writable disk; shared read-only ones in place."""
        from fcvm.storage.btrfs import clone_file

        description = snapshot.description
        drives = []
        for record in description.drives:
            source = description.drive_path(snapshot.directory, record)
            if record.read_only:
                drives.append(Drive(record.drive_id, source, read_only=True, root=record.root))
                continue
            target = self.workdir / source.name
            clone_file(source, target)
            drives.append(Drive(record.drive_id, target, root=record.root))
            if description.hypervisor == VmmKind.FIRECRACKER and record.baked_path:
                self._stand_in_for_baked_disk(Path(record.baked_path), source)
        maps = tuple(VolumeMap(Path(v.host_dir), v.guest_path, v.read_only) for v in description.volumes)
        initrd = Path(description.initrd) if description.initrd else None
        return Path(description.kernel), initrd, drives, maps

    def _stand_in_for_baked_disk(self, baked: Path, frozen: Path) -> None:
        """Firecracker reopens a snapshot's drives where the source had them before the clone's `PATCH /drives`
        moves them to its own disk. When the source is gone, a reflink of the frozen disk stands in there until
        the clone runs."""
        from fcvm.storage.btrfs import clone_file

        assert self.journal is not None
        if baked.exists():
            return
        missing = baked.parent
        while not missing.parent.exists():
            missing = missing.parent
        stand_in = missing if not baked.parent.exists() else baked
        entry = self.journal.record("dir" if stand_in != baked else "file", path=str(stand_in))
        baked.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        clone_file(frozen, baked)
        self._stand_ins.append((entry, stand_in))

    def _machine_record(self, spec: MachineSpec, maps: tuple[VolumeMap, ...]) -> dict[str, Any]:
        """What `fcvm snapshot create` needs to save this VM and describe the machine a clone must rebuild."""
        assert self.network is not None
        machine: dict[str, Any] = {
            "vmm": self.request.hypervisor, "vcpus": spec.vcpus, "mem_mib": spec.mem_mib,
            "drives": [{"drive_id": d.drive_id, "read_only": d.read_only, "root": d.root, "path": str(d.path)}
                       for d in spec.drives],
            "guest_mac": spec.guest_mac, "tap": spec.tap, "network_mode": self.network.mode,
            "kernel": str(spec.kernel), "initrd": str(spec.initrd or ""),
            "volumes": [{"host_dir": str(m.host_dir), "guest_path": m.guest_path, "read_only": m.read_only}
                        for m in maps],
            "agent_credential": self._credential.hex(),  # a clone's host side must know it
        }
        if self.request.hypervisor == VmmKind.QEMU:
            from fcvm.vmm.qemu import qmp_socket

            if spec.mem_file is None:  # a clone's RAM is private: a snapshot of it would carry all of it
                return {}
            machine.update(qmp_socket=str(qmp_socket(spec)), mem_file=str(spec.mem_file))
        else:
            from fcvm.vmm.firecracker.vm import FirecrackerVm

            assert isinstance(self.hypervisor, FirecrackerVm)
            machine["api_socket"] = str(self.hypervisor.api_socket)
        return machine

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
            kernel = built.vmlinux if request.hypervisor == VmmKind.FIRECRACKER else built.bzimage
        initrd = request.initrd or (built.initramfs if built else None)
        if initrd is not None and not initrd.is_file():
            raise UsageError(f"--initrd {initrd} does not exist")
        return kernel, initrd, rootfs

    def _allocate_uid(self, kind: str) -> int:
        """A uid (and gid) for this VM's VMM alone (a jailed Firecracker, or QEMU), each kind from a range of its
        own: no two VMMs share an identity."""
        from fcvm.vmm.firecracker.jail import JAIL_UID_BASE, JAIL_UID_COUNT
        from fcvm.vmm.qemu import VMM_UID_BASE, VMM_UID_COUNT

        assert self.vm is not None
        base, count = (JAIL_UID_BASE, JAIL_UID_COUNT) if kind == "jail_uid" else (VMM_UID_BASE, VMM_UID_COUNT)
        return int(self.store.allocate(kind, self.vm.id, (str(base + i) for i in range(count))))

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

    def _hypervisor(self, spec: MachineSpec, prepare: Plan) -> Hypervisor:
        from fcvm.guest import qemu_boot_args

        if self.request.hypervisor == VmmKind.FIRECRACKER:
            from fcvm.vmm.firecracker.vm import FirecrackerVm

            assert self.request.firecracker_bin is not None
            assert self.network is not None
            guest = self.network.guest_spec()
            # MMDS needs a source address before the plan (which carries the address) can be read.
            spec.boot_args = (f"{qemu_boot_args()} fcvm_plan=mmds "
                              f"fcvm_net={guest['address']}/{guest['prefix']},{guest['gateway']}")
            return FirecrackerVm(spec, binary=self.request.firecracker_bin,
                                 mmds=json.loads(prepare.to_json()), jail=self.jail)
        from fcvm.vmm.qemu import QemuVm

        spec.boot_args = f"{qemu_boot_args()} fcvm_plan=channel"
        return QemuVm(spec)

    def _on_stage(self, stage: str, at: float | None = None) -> None:
        """Seconds since `fcvm podman run` began, per stage, kept in the row for `fcvm inspect` and bench/."""
        if stage in self._timings or self.vm is None:
            return
        self._timings[stage] = round((at or time.monotonic()) - self._t0, 3)
        self.store.update_config(self.vm.id, timings=self._timings)
        if stage == "container_running" and self.request.health_url:
            self._start_health_poll(self.request.health_url)
        if stage == "healthy" and self._cache_shape is not None:
            threading.Thread(target=self._take_cache_entry, args=(CacheLevel.STARTUP,), daemon=True,
                             name="cache-startup").start()

    def _on_prepared(self) -> None:
        """The image is loaded and podman warm, and nothing of the run has reached the guest yet: the moment
        for a pre-start cache entry (taken before the agent gets its plan, so the pause is the run's own)."""
        if self._cache_shape is not None:
            self._take_cache_entry(CacheLevel.PRESTART)

    def _take_cache_entry(self, level: CacheLevel) -> None:
        """A cache entry of this run, unless it is being stopped or its container has ended: an entry that caught
        the container on its way out would hand that to every later run it starts."""
        from fcvm.run.warm import take_entry
        from fcvm.snapshot.cache import remove_entry

        assert self.vm is not None and self._cache_shape is not None and self.agent is not None
        with self._entry_lock:
            if self._stop.is_set() or self.agent.container_done.is_set():
                return
            record = take_entry(self.vm.id, self._cache_shape, level)
            if record is not None and self.agent.container_done.is_set():  # it may have ended during the pause
                store = Store()
                try:
                    remove_entry(store, record)
                finally:
                    store.close()

    def _set_health(self, health: Health) -> None:
        assert self.vm is not None
        if health == Health.HEALTHY:
            self._on_stage("healthy")
        self.store.update_vm(self.vm.id, health=health)
        if health != Health.STARTING and self._booted and self._on_ready is not None:
            on_ready, self._on_ready = self._on_ready, None
            on_ready()

    def _start_hypervisor(self) -> None:
        assert self.hypervisor is not None and self.journal is not None and self.vm is not None
        self._on_stage("vmm_starting")
        self.hypervisor.start()  # for Firecracker this returns once InstanceStart was sent
        for stage, at in self.hypervisor.marks.items():
            self._on_stage(stage, at)
        for entry, stand_in in self._stand_ins:  # the clone has its own disks now
            if stand_in.is_dir():
                shutil.rmtree(stand_in)
            else:
                stand_in.unlink(missing_ok=True)
            self.journal.forget(entry)
        self._on_stage("vmm_started")
        self._booted = True
        vmm = self.hypervisor.process
        self.journal.record("process", pid=vmm.pid, start=vmm.start, grace=5, group=True)
        self.store.update_vm(self.vm.id, status=VmStatus.RUNNING, started=time.time(), health=Health.STARTING,
                             hypervisor=self.hypervisor.name)
        self._log.info("%s started (pid %d)", self.hypervisor.name, vmm.pid)

    # --- host-side listeners: the control port and one fuse-pipe server per --map ---------------

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

    def _serve_volumes(self, vsock_uds: Path, maps: tuple[VolumeMap, ...]) -> None:
        """One fuse-pipe server per --map on `<vsock uds>_<5000+i>`; the guest relay reconnects to the same
        server (and session) after a channel reset, and a clone's relay to the clone's own servers."""
        if not maps:
            return
        from fcvm.fusepipe import Server

        for index, volume in enumerate(maps):
            port = wire_ports.HOST_VOLUME_BASE + index
            # The server sees only connections that proved the agent's credential.
            gate = AgentGate(self._listen(Path(f"{vsock_uds}_{port}")), self._credential,
                             name=f"volume port {port}", logger=self._log)
            server = Server(str(volume.host_dir), read_only=volume.read_only)
            self._volume_servers.append(server)
            start_thread(server.serve_forever, cast(socket.socket, gate))  # it calls settimeout and accept only

    def _start_health_poll(self, health_url: str) -> None:
        assert self.network is not None
        target = published_health_target(health_url, self.network.published())
        if target is None:
            self._log.warning("--health-check %s: its port is not published; health stays unknown", health_url)
            return
        start_thread(poll_health, target, self._stop, self._set_health, self._log)

    # --- supervision and teardown ----------------------------------------------------------------

    def _supervise(self) -> None:
        assert self.hypervisor is not None and self.agent is not None
        agent = self.agent
        deadline = time.monotonic() + self.request.boot_timeout
        server = self._page_server()
        restore_deadline = time.monotonic() + min(self.request.boot_timeout, RESTORE_TIMEOUT)
        while not self._stop.is_set() and not agent.container_done.is_set():
            if self.request.snapshot and "restored" not in self._timings and time.monotonic() > restore_deadline:
                self._failure = f"the restored guest did not answer within {RESTORE_TIMEOUT:.0f} s"
                return
            if server is not None and not server.alive():
                # Without its page server a UFFD clone's next fault would hang the guest for good.
                self._failure = "its memory server (fcvm snapshot serve) is gone; the clone cannot go on"
                return
            if not agent.container_running.is_set() and time.monotonic() > deadline:
                self._failure = (f"the container did not start within {self.request.boot_timeout:.0f} s "
                                 "(--boot-timeout); the guest may be stuck")
                return
            code = self.hypervisor.wait(0.2)
            if code is not None:
                if agent.exit_code is None and not agent.failure:
                    self._failure = f"the VM exited unexpectedly (hypervisor exit code {code})"
                return
        if self._stop_reason and not agent.container_done.is_set():
            # A cache entry being taken is finished before the container hears of the stop, and none is begun
            # after (_stop is set).
            with self._entry_lock:
                pass
            agent.stop_container(self._stop_grace(), self._stop_reason)

    def _stop_grace(self) -> float:
        """What `fcvm stop -t` asked for, else podman's default: a terminal's Ctrl-C, a plain SIGTERM."""
        assert self.vm is not None
        row = self.store.get_vm(self.vm.id)
        requested = row.config.get("stop_grace") if row is not None and self._stop_reason == "SIGTERM" else None
        return float(requested) if isinstance(requested, (int, float)) else DEFAULT_STOP_GRACE

    def _page_server(self) -> ProcessRef | None:
        if self.request.serve_id is None:
            return None
        server = self.store.get_vm(self.request.serve_id)
        return server.process if server is not None else None

    def _teardown(self) -> None:
        self._stop.set()
        if self.hypervisor is not None:
            try:
                self.hypervisor.stop(timeout=5)
            except Exception as exc:  # teardown goes on: the journal still stops the VMM process
                self._log.warning("stopping the hypervisor: %r", exc)
        for server in self._volume_servers:
            server.close()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        if self._container_log is not None:
            self._container_log.close()
        if self.vm is None:
            return
        exit_code = self.agent.exit_code if self.agent else None
        failures = cleanup.finish_vm(self.store, self.vm, exit_code=exit_code)
        for failure in failures:
            self._log.error("left behind (run `fcvm gc`): %s", failure)
        # A VM that never booted (or whose restore never reached its agent) leaves no row behind, like a failed
        # `podman run` that created nothing; a warm run then boots cold under the same id.
        if self.request.remove or not self._booted or self._restoring_failed():
            self.store.delete_vm(self.vm.id)
            failed = self._failure or (self.agent.failure if self.agent else None)
            # Keep the console of a failed boot for the error message's hint, and a detached run's log for the
            # parent that reports it (and then removes it).
            if not failed and not (self.log_dir / SUPERVISOR_LOG).exists():
                shutil.rmtree(self.log_dir, ignore_errors=True)
