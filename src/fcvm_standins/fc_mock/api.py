"""fc-mock's REST API, independent of HTTP: `FcMock.handle(method, path, body) -> Response`.

Order of checks, as in Firecracker: route, body size, JSON, schema (the official spec, closed
objects), ids, then the VM state rules from NOTES.md, then semantics (files exist, one root
drive, ...). Resources fc-mock cannot emulate on QEMU (balloon, entropy, pmem, cpu-config, ...)
pass validation and the state rules and are then refused with a 400 that says so.

Snapshots, on QEMU (see snapshot.py for the file): `PATCH /vm` is QMP stop/cont; `PUT /snapshot/create` (Full,
Paused only) writes the configuration and the device-state stream to `snapshot_path` and a reflink of the
shared RAM file to `mem_file_path`, and leaves the VM paused, as Firecracker does. `PUT /snapshot/load` (a fresh
process only) rebuilds the machine from the file, with `network_overrides`, `vsock_override` and the memory
backend: File maps the memory file privately, Uffd preloads fcvm's library into QEMU, which does Firecracker's
handshake with the page server at `backend_path`. Firecracker reopens the drives at their baked paths on load
and lets `PATCH /drives` move them before `PATCH /vm Resumed`; QEMU opens its drives when it starts, so after a
load with `resume_vm: false` fc-mock checks the baked paths, applies the patches and starts QEMU at the resume.
A client sees Firecracker's sequence either way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, Protocol

from fcvm.core import log
from fcvm.core.proc import ProcessRef
from fcvm.vmm.base import MachineSpec, MemBackend, RestoreSpec
from fcvm_standins.fc_mock.mmds import merge_patch
from fcvm_standins.fc_mock.snapshot import SnapshotFileError, SnapshotHeader, qemu_order
from fcvm_standins.fc_mock.spec import Spec

_log = log.get("fc_mock")

MAX_PAYLOAD = 51200
ID_RE = re.compile(r"^[A-Za-z0-9_]+$")
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
MMDS_IP_RE = re.compile(
    r"^169\.254\.([1-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-4])"
    r"\.([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])$"
)
DEFAULT_BOOT_ARGS = (
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce"
)

NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
PRE_BOOT_ONLY = "The requested operation is not supported after starting the microVM."
POST_BOOT_ONLY = "The requested operation is not supported before starting the microVM."
# Operations fc-mock checks for the VM's state, as Firecracker does, then refuses: what its QEMU backend lacks.
_UNEMULATED_BEFORE_BOOT = {
    "putBalloon": "the balloon device",
    "putEntropyDevice": "the entropy device",
    "putCpuConfiguration": "custom CPU templates",
    "putSerialDevice": "serial output redirection (the console goes to stdout)",
    "putMemoryHotplug": "memory hotplug",
}
_UNEMULATED_AFTER_BOOT = {
    "patchGuestPmemByID": "pmem devices",
    "patchMemoryHotplug": "memory hotplug",
}


class Backend(Protocol):
    """What fc-mock needs from a hypervisor (QemuVm satisfies it)."""

    @property
    def process(self) -> ProcessRef: ...

    def start(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def vmm_version(self) -> str:
        """The hypervisor's version, recorded in a snapshot: only the same one can load its state."""
        ...

    def save(self, state: Path, memory: Path, header: bytes) -> None:
        """Write `header` and the device state of the paused VM to `state` and its RAM to `memory`; stay paused."""
        ...


BackendFactory = Callable[[MachineSpec], Backend]


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-serialisable, or None for an empty body

    @classmethod
    def fault(cls, message: str, status: int = 400) -> Response:
        return cls(status, {"fault_message": message})


class Fault(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Config:
    boot_source: dict[str, Any] | None = None
    machine: dict[str, Any] = field(
        default_factory=lambda: {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                 "track_dirty_pages": False, "huge_pages": "None"}
    )
    drives: dict[str, dict[str, Any]] = field(default_factory=dict)
    ifaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    vsock: dict[str, Any] | None = None
    mmds_config: dict[str, Any] | None = None
    logger: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _readable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.R_OK)


class FcMock:
    """Firecracker's API state machine, booting through `backend_factory` on InstanceStart."""

    def __init__(
        self,
        spec: Spec,
        *,
        instance_id: str,
        workdir: Path,
        backend_factory: BackendFactory,
        max_payload: int = MAX_PAYLOAD,
        mmds_size_limit: int | None = None,
        on_exit: Callable[[int], None] | None = None,
        guest_mmds: Callable[[str, str, Callable[[], Any], str], Any] | None = None,
        tap_exists: Callable[[str], bool] | None = None,
        on_logger: Callable[[dict[str, Any]], None] | None = None,
        enable_pci: bool = False,
    ) -> None:
        self.spec = spec
        self.instance_id = instance_id
        self.workdir = workdir
        self.backend_factory = backend_factory
        self.max_payload = max_payload
        self.mmds_size_limit = mmds_size_limit or max_payload
        self.on_exit = on_exit
        self.guest_mmds_factory = guest_mmds
        self.tap_exists = tap_exists or _interface_exists
        self.on_logger = on_logger
        self.enable_pci = enable_pci
        self.state = NOT_STARTED
        self.config = Config()
        self.mmds: Any = None  # None until the first PUT /mmds
        self.fresh = True  # no boot-specific resource configured yet (snapshot/load allowed)
        self.backend: Backend | None = None
        self.guest_mmds: Any = None
        self.machine_spec: MachineSpec | None = None  # the machine the backend runs
        self.pending: RestoreSpec | None = None  # loaded with resume_vm false: QEMU starts at PATCH /vm Resumed
        self._lock = threading.RLock()
        self._exited = False

    # -- entry point ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes) -> Response:
        with self._lock:
            try:
                return self._handle(method, path.split("?", 1)[0], raw)
            except Fault as fault:
                _log.warning("%s %s: %s", method, path, fault)
                return Response.fault(str(fault), fault.status)

    def _handle(self, method: str, path: str, raw: bytes) -> Response:
        route, params, _path_known = self.spec.match(method, path)
        if route is None:
            raise Fault(f"Invalid request method and/or path: {method} {path}.")
        if len(raw) > self.max_payload:
            raise Fault(f"Request payload with size {len(raw)} is larger than the limit of "
                        f"{self.max_payload} allowed by server.")
        body: Any = None
        if route.body is not None:
            if not raw.strip():
                if route.body_required or method in ("PUT", "PATCH"):
                    raise Fault("The body of the request is empty; a JSON body is required.")
            else:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise Fault("An error occurred when deserializing the json body of a request: "
                                f"{exc}.") from None
                problems = self.spec.errors(route.body, body, partial=route.partial)
                if problems:
                    raise Fault("An error occurred when deserializing the json body of a request: "
                                + "; ".join(problems) + ".")
        elif raw.strip() and method != "GET":
            raise Fault(f"{method} {path} takes no body.")
        for name, value in params.items():
            if not ID_RE.match(value):
                raise Fault(f"Invalid ID `{value}`: {name} may contain only A-Z, a-z, 0-9 and '_'.")
        if route.operation in _UNEMULATED_BEFORE_BOOT:
            self._pre_boot()
            self._unsupported(_UNEMULATED_BEFORE_BOOT[route.operation])
        if route.operation in _UNEMULATED_AFTER_BOOT:
            self._post_boot()
            self._unsupported(_UNEMULATED_AFTER_BOOT[route.operation])
        handler = getattr(self, "op_" + route.operation, None)
        if handler is None:
            raise Fault(f"fc-mock does not emulate {method} {route.template} ({route.operation}).")
        result: Response | None = handler(body, **params)
        return result or Response(204)

    # -- state helpers ----------------------------------------------------------------------------

    def _pre_boot(self, *, boot_specific: bool = True) -> None:
        if self.state != NOT_STARTED:
            raise Fault(PRE_BOOT_ONLY)
        if boot_specific:
            self.fresh = False

    def _post_boot(self) -> None:
        if self.state == NOT_STARTED:
            raise Fault(POST_BOOT_ONLY)

    @staticmethod
    def _same_id(path_id: str, body_id: str) -> None:
        if path_id != body_id:
            raise Fault("The id from the path does not match the id from the body!")

    def _unsupported(self, what: str) -> NoReturn:
        raise Fault(f"fc-mock does not emulate {what}: its QEMU backend has no equivalent.")

    # -- informational ----------------------------------------------------------------------------

    def op_describeInstance(self, body: None) -> Response:
        return Response(200, {"app_name": "Firecracker", "id": self.instance_id, "state": self.state,
                              "vmm_version": self.spec.version})

    def op_getFirecrackerVersion(self, body: None) -> Response:
        return Response(200, {"firecracker_version": self.spec.version})

    def op_getMachineConfiguration(self, body: None) -> Response:
        return Response(200, dict(self.config.machine))

    def op_getExportVmConfig(self, body: None) -> Response:
        full = {**self._vm_config(), "logger": self.config.logger, "metrics": self.config.metrics}
        return Response(200, {k: copy.deepcopy(v) for k, v in full.items() if v is not None})

    def _vm_config(self) -> dict[str, Any]:
        """The machine's configuration (FullVmConfiguration keys), drives in QEMU's device order."""
        c = self.config
        full: dict[str, Any] = {
            "boot-source": c.boot_source,
            "machine-config": c.machine,
            "drives": qemu_order(list(c.drives.values())),
            "network-interfaces": list(c.ifaces.values()),
            "vsock": c.vsock,
            "mmds-config": c.mmds_config,
        }
        return {k: copy.deepcopy(v) for k, v in full.items() if v is not None}

    # -- pre-boot resources ---------------------------------------------------------------------

    def op_putGuestBootSource(self, body: dict[str, Any]) -> None:
        self._pre_boot()
        if not _readable(body["kernel_image_path"]):
            raise Fault(f"Cannot open kernel image {body['kernel_image_path']}: No such file or directory "
                        "(os error 2)")
        initrd = body.get("initrd_path")
        if initrd is not None and not _readable(initrd):
            raise Fault(f"Cannot open initrd {initrd}: No such file or directory (os error 2)")
        self.config.boot_source = dict(body)

    def _check_machine(self, machine: dict[str, Any]) -> None:
        vcpus, mem = machine["vcpu_count"], machine["mem_size_mib"]
        if machine.get("smt") and vcpus > 1 and vcpus % 2:
            raise Fault("The vCPU number is invalid! The vCPU number can only be 1 or an even number "
                        "when SMT is enabled.")
        if mem < 1:
            raise Fault("The memory size (MiB) is invalid.")
        if machine.get("huge_pages") == "2M" and mem % 2:
            raise Fault("The memory size (MiB) must be a multiple of 2 when 2M huge pages are used.")
        if machine.get("cpu_template", "None") != "None":
            self._unsupported("CPU templates")

    def op_putMachineConfiguration(self, body: dict[str, Any] | None) -> None:
        self._pre_boot()
        if body is None:
            raise Fault("The body of the request is empty; a JSON body is required.")
        machine = {"smt": False, "track_dirty_pages": False, "huge_pages": "None", **body}
        self._check_machine(machine)
        self.config.machine = machine

    def op_patchMachineConfiguration(self, body: dict[str, Any] | None) -> None:
        self._pre_boot()
        machine = {**self.config.machine, **(body or {})}
        self._check_machine(machine)
        self.config.machine = machine

    def op_putGuestDriveByID(self, body: dict[str, Any], drive_id: str) -> None:
        self._pre_boot()
        self._same_id(drive_id, body["drive_id"])
        if "socket" in body:
            self._unsupported("vhost-user block devices")
        path = body.get("path_on_host")
        if path is None:
            raise Fault("Unable to create the virtio block device: path_on_host is required.")
        if not _exists(path):
            raise Fault(f"Unable to create the virtio block device: Virtio backend error: Error manipulating "
                        f"the backing file: No such file or directory (os error 2) {path}")
        if body["is_root_device"]:
            for other_id, other in self.config.drives.items():
                if other_id != drive_id and other["is_root_device"]:
                    raise Fault("A root block device already exists!")
        if body.get("io_engine") == "Async":
            _log.info("drive %s: io_engine Async is served by QEMU's own I/O", drive_id)
        self.config.drives[drive_id] = dict(body)

    def op_putGuestNetworkInterfaceByID(self, body: dict[str, Any], iface_id: str) -> None:
        self._pre_boot()
        self._same_id(iface_id, body["iface_id"])
        mac = body.get("guest_mac")
        if mac is not None and not MAC_RE.match(mac):
            raise Fault(f"Invalid guest MAC address {mac!r}.")
        for other_id, other in self.config.ifaces.items():
            if other_id == iface_id:
                continue
            if other["host_dev_name"] == body["host_dev_name"]:
                raise Fault(f"The host device name {body['host_dev_name']} is already in use.")
            if mac is not None and other.get("guest_mac") == mac:
                raise Fault(f"The guest MAC address {mac} is already in use.")
            raise Fault("fc-mock supports one network interface (its QEMU backend takes one TAP).")
        if "mtu" in body:
            self._unsupported("the network interface MTU")
        if not self.tap_exists(body["host_dev_name"]):
            raise Fault(f"Could not create the network device: Open tap device failed: Error while creating "
                        f"ifreq structure: No such device (os error 19). Invalid TAP name: "
                        f"{body['host_dev_name']}")
        self.config.ifaces[iface_id] = dict(body)

    def op_putGuestVsock(self, body: dict[str, Any]) -> None:
        self._pre_boot()
        if os.path.lexists(body["uds_path"]):
            raise Fault(f"Cannot create backend for vsock device: Error binding to the host-side Unix "
                        f"socket: Address in use (os error 98): {body['uds_path']}")
        body = {k: v for k, v in body.items() if k != "vsock_id"}
        self.config.vsock = body

    def op_putMmdsConfig(self, body: dict[str, Any]) -> None:
        self._pre_boot()
        ifaces = body["network_interfaces"]
        if not ifaces or any(i not in self.config.ifaces for i in ifaces):
            raise Fault("The list of network interface IDs provided contains at least one ID that does not "
                        "correspond to any existing network interface.")
        address = body.get("ipv4_address", "169.254.169.254")
        if not MMDS_IP_RE.match(address):
            raise Fault(f"The MMDS IPv4 address is not link local: {address}.")
        if body.get("imds_compat"):
            self._unsupported("imds_compat")
        self.config.mmds_config = {"version": "V1", "ipv4_address": address, **body}

    def op_putLogger(self, body: dict[str, Any]) -> None:
        self._pre_boot(boot_specific=False)
        if self.on_logger is not None:
            try:
                self.on_logger(body)
            except OSError as exc:
                raise Fault(f"Cannot initialize the logger: {exc}") from None
        self.config.logger = dict(body)

    def op_putMetrics(self, body: dict[str, Any]) -> None:
        self._pre_boot(boot_specific=False)
        if self.config.metrics is not None:
            raise Fault("Reinitialization of metrics not allowed.")
        try:
            Path(body["metrics_path"]).open("a").close()
        except OSError as exc:
            raise Fault(f"Cannot initialize the metrics system: {exc}") from None
        self.config.metrics = dict(body)

    def op_putGuestPmemByID(self, body: dict[str, Any], id: str) -> None:
        self._pre_boot()
        self._same_id(id, body["id"])
        self._unsupported("pmem devices")

    # -- post-boot updates --------------------------------------------------------------------

    def op_patchGuestDriveByID(self, body: dict[str, Any], drive_id: str) -> None:
        self._post_boot()
        self._same_id(drive_id, body["drive_id"])
        if drive_id not in self.config.drives:
            raise Fault(f"Unable to patch the block device: drive {drive_id} does not exist.")
        if self.pending is None:
            self._unsupported("changing a drive of a running guest (only between snapshot load and resume)")
        if "rate_limiter" in body:
            self._unsupported("drive rate limiters")
        path = body.get("path_on_host")
        if path is not None:
            if not _exists(path):
                raise Fault(f"Unable to patch the block device: Virtio backend error: Error manipulating the "
                            f"backing file: No such file or directory (os error 2) {path}")
            self.config.drives[drive_id]["path_on_host"] = path

    def op_patchGuestNetworkInterfaceByID(self, body: dict[str, Any], iface_id: str) -> None:
        self._post_boot()
        self._same_id(iface_id, body["iface_id"])
        if iface_id not in self.config.ifaces:
            raise Fault(f"Unable to patch the network interface: {iface_id} does not exist.")
        self._unsupported("network rate limiters")

    def op_patchVm(self, body: dict[str, Any]) -> None:
        self._post_boot()
        if self.pending is not None:  # loaded, not resumed: nothing runs yet
            if body["state"] == "Resumed":
                self._run_machine(replace(self.build_machine_spec(), restore=self.pending), "resume")
                self.pending = None
            return
        assert self.backend is not None
        try:
            if body["state"] == "Paused":
                if self.state != PAUSED:
                    self.backend.pause()
                self.state = PAUSED
            else:
                if self.state != RUNNING:
                    self.backend.resume()
                self.state = RUNNING
        except Exception as exc:
            raise Fault(f"Failed to {body['state'].lower().rstrip('d')} the microVM: {exc}") from None

    # -- snapshots ------------------------------------------------------------------------------

    def op_createSnapshot(self, body: dict[str, Any]) -> None:
        self._post_boot()
        if self.state != PAUSED:
            raise Fault("Create snapshot error: Cannot save the microVM state: the microVM is not paused. "
                        "Pause it first with PATCH /vm {\"state\": \"Paused\"}.")
        if body.get("snapshot_type") == "Diff":
            if not self.config.machine.get("track_dirty_pages"):
                raise Fault("Create snapshot error: Diff snapshots require track_dirty_pages in machine-config.")
            raise Fault("Create snapshot error: fc-mock takes Full snapshots only: its QEMU (7.2) has no format for "
                        "the pages dirtied since the last one. Use snapshot_type Full.")
        if self.pending is not None or (self.machine_spec is not None and self.machine_spec.restore is not None):
            # A restored QEMU's RAM is the snapshot's file mapped privately, or anonymous memory filled by the page
            # server: not a shared file whose reflink is the memory, so its device-state stream would carry it all.
            raise Fault("Create snapshot error: fc-mock cannot snapshot a microVM restored from a snapshot: its "
                        "guest memory is not a shared file. Snapshot the original microVM.")
        backend = self.backend
        assert backend is not None
        state, memory = Path(body["snapshot_path"]), Path(body["mem_file_path"])
        try:
            header = SnapshotHeader(self.spec.version, backend.vmm_version(), self._vm_config())
            for target in (state, memory):  # Firecracker overwrites both files
                target.unlink(missing_ok=True)
            backend.save(state, memory, header.line())
        except Exception as exc:
            _log.error("snapshot create failed: %s", exc)
            raise Fault(f"Create snapshot error: {exc}") from None
        _log.info("snapshot created: %s (memory %s)", state, memory)

    def op_loadSnapshot(self, body: dict[str, Any]) -> None:
        if self.state != NOT_STARTED:
            raise Fault(PRE_BOOT_ONLY)
        if not self.fresh:
            raise Fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        if "mem_backend" in body and "mem_file_path" in body:
            raise Fault("Only one of mem_backend and mem_file_path may be given.")
        if "mem_backend" not in body and "mem_file_path" not in body:
            raise Fault("A memory backend (mem_backend) is required to load a snapshot.")
        if body.get("clock_realtime"):
            self._unsupported("clock_realtime (TCG has no KVM clock to advance; the guest agent resyncs the clock)")
        snapshot_path = Path(body["snapshot_path"])
        try:
            header, offset = SnapshotHeader.read(snapshot_path, self.spec)
        except SnapshotFileError as exc:
            raise Fault(f"Load snapshot error: {exc}") from None
        if _minor(header.firecracker_version) != _minor(self.spec.version):
            raise Fault(f"Load snapshot error: the snapshot was taken by Firecracker {header.firecracker_version}, "
                        f"whose snapshot format this Firecracker {self.spec.version} cannot read.")
        config = self._restored_config(header, body)
        restore = self._memory_backend(body, snapshot_path, offset, header, config)
        self.config = config
        self.fresh = False
        if body.get("resume_vm"):
            self._run_machine(replace(self.build_machine_spec(), restore=restore), "load")
        else:
            self.pending = restore
            self.state = PAUSED

    def _restored_config(self, header: SnapshotHeader, body: dict[str, Any]) -> Config:
        """The snapshot's configuration with the load's overrides, once every host resource it names is usable."""
        vm = copy.deepcopy(header.vm)
        config = Config(
            boot_source=vm["boot-source"], machine=vm["machine-config"],
            drives={d["drive_id"]: d for d in vm.get("drives", [])},
            ifaces={i["iface_id"]: i for i in vm.get("network-interfaces", [])},
            vsock=vm.get("vsock"), mmds_config=vm.get("mmds-config"),
            logger=self.config.logger, metrics=self.config.metrics,
        )
        if body.get("track_dirty_pages") is not None:
            config.machine["track_dirty_pages"] = body["track_dirty_pages"]
        for override in body.get("network_overrides", []):
            iface = config.ifaces.get(override["iface_id"])
            if iface is None:
                raise Fault(f"Load snapshot error: network override for {override['iface_id']}: the snapshot has "
                            "no network interface with that id.")
            iface["host_dev_name"] = override["host_dev_name"]
        for iface in config.ifaces.values():
            if not self.tap_exists(iface["host_dev_name"]):
                raise Fault(f"Load snapshot error: Open tap device failed: No such device (os error 19). Invalid "
                            f"TAP name: {iface['host_dev_name']}")
        if "vsock_override" in body:
            if config.vsock is None:
                raise Fault("Load snapshot error: vsock_override given, but the snapshot has no vsock device.")
            config.vsock["uds_path"] = body["vsock_override"]["uds_path"]
        if config.vsock is not None and os.path.lexists(config.vsock["uds_path"]):
            raise Fault(f"Load snapshot error: Cannot create backend for vsock device: Error binding to the "
                        f"host-side Unix socket: Address in use (os error 98): {config.vsock['uds_path']}")
        for drive in config.drives.values():  # Firecracker reopens every drive at its baked path
            if not _exists(drive["path_on_host"]):
                raise Fault(f"Load snapshot error: Cannot restore the block device {drive['drive_id']}: Error "
                            f"manipulating the backing file: No such file or directory (os error 2) "
                            f"{drive['path_on_host']}")
        return config

    def _memory_backend(self, body: dict[str, Any], state: Path, offset: int, header: SnapshotHeader,
                        config: Config) -> RestoreSpec:
        backend = body.get("mem_backend") or {"backend_type": "File", "backend_path": body["mem_file_path"]}
        path = Path(backend["backend_path"])
        if backend["backend_type"] == "Uffd":
            if not path.is_socket():
                raise Fault(f"Load snapshot error: Failed to connect to the UFFD page server at {path}: No such "
                            "file or directory (os error 2)")
            from fcvm.core import paths
            from fcvm.uffd import preload

            library = preload.find([paths.assets_dir()])
            if library is None:
                raise Fault("Load snapshot error: fc-mock needs fcvm's UFFD preload library to give QEMU's memory "
                            "to a page server; run `fcvm setup uffd-preload`.")
            # No memory file: the page server holds the memory and QEMU maps anonymous RAM.
            return RestoreSpec(state=state, memory=Path(os.devnull), backend=MemBackend.UFFD, state_offset=offset,
                               uffd_socket=path, preload=library, vmm_version=header.qemu_version)
        size = int(config.machine["mem_size_mib"]) << 20
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise Fault(f"Load snapshot error: Cannot open the memory file {path}: {exc.strerror}") from None
        if actual != size:
            raise Fault(f"Load snapshot error: the memory file {path} has {actual} bytes, and the snapshot's guest "
                        f"has {size}.")
        return RestoreSpec(state=state, memory=path, backend=MemBackend.FILE, state_offset=offset,
                           vmm_version=header.qemu_version)

    # -- MMDS -----------------------------------------------------------------------------------

    def _mmds_fits(self, store: Any) -> None:
        size = len(json.dumps(store, separators=(",", ":")))
        if size > self.mmds_size_limit:
            raise Fault(f"The MMDS patch request doesn't fit. The MMDS data store is full "
                        f"({size} > {self.mmds_size_limit} bytes).", status=413)

    def op_putMmds(self, body: Any) -> None:
        store = body if body is not None else {}
        self._mmds_fits(store)
        self.mmds = store

    def op_patchMmds(self, body: Any) -> None:
        if self.mmds is None:
            raise Fault("The MMDS data store is not initialized.")
        merged = merge_patch(self.mmds, body if body is not None else {})
        self._mmds_fits(merged)
        self.mmds = merged

    def op_getMmds(self, body: None) -> Response:
        return Response(200, self.mmds if self.mmds is not None else {})

    # -- actions --------------------------------------------------------------------------------

    def op_createSyncAction(self, body: dict[str, Any]) -> None:
        action = body["action_type"]
        if action == "InstanceStart":
            self._pre_boot()
            self._instance_start()
        elif action == "SendCtrlAltDel":
            self._post_boot()
            self._ctrl_alt_del()
        elif action == "FlushMetrics":
            if self.config.metrics is None:
                raise Fault("The metrics system is not initialized.")
            with Path(self.config.metrics["metrics_path"]).open("a") as f:
                f.write(json.dumps({"fc_mock": {"state": self.state}}) + "\n")

    def build_machine_spec(self) -> MachineSpec:
        """The configured VM as a MachineSpec, with what Firecracker appends to the command line."""
        from fcvm.vmm.base import Drive

        c = self.config
        assert c.boot_source is not None
        boot_args = c.boot_source.get("boot_args", DEFAULT_BOOT_ARGS)
        drives = qemu_order(list(c.drives.values()))
        root = drives[0] if drives and drives[0]["is_root_device"] else None
        if root is not None:
            mode = "ro" if root.get("is_read_only") else "rw"
            device = f"PARTUUID={root['partuuid']}" if root.get("partuuid") else "/dev/vda"
            boot_args += f" root={device} {mode}"
        if not self.enable_pci:
            boot_args += " pci=off"
        iface = next(iter(c.ifaces.values()), None)
        return MachineSpec(
            name=self.instance_id,
            workdir=self.workdir,
            kernel=Path(c.boot_source["kernel_image_path"]),
            initrd=Path(c.boot_source["initrd_path"]) if c.boot_source.get("initrd_path") else None,
            boot_args=boot_args.strip(),
            vcpus=int(c.machine["vcpu_count"]),
            mem_mib=int(c.machine["mem_size_mib"]),
            drives=[Drive(d["drive_id"], Path(d["path_on_host"]), bool(d.get("is_read_only")),
                          bool(d["is_root_device"])) for d in drives],
            tap=iface["host_dev_name"] if iface else None,
            guest_mac=iface.get("guest_mac") if iface else None,
            vsock_uds=Path(c.vsock["uds_path"]) if c.vsock else None,
            guest_cid=int(c.vsock["guest_cid"]) if c.vsock else 3,
            enter_argv=[],  # fc-mock already runs inside the VM's namespaces
            # Shared file RAM in fc-mock's own directory: its reflink is a snapshot's memory file.
            mem_file=self.workdir / "mem",
        )

    def _instance_start(self) -> None:
        if self.config.boot_source is None:
            raise Fault("Cannot start microvm without kernel configuration.")
        self._run_machine(self.build_machine_spec(), "start")

    def _run_machine(self, spec: MachineSpec, what: str) -> None:
        """Start the backend on `spec` (a cold boot, or a restore that ends running) and watch it."""
        if spec.restore is not None:
            spec = replace(spec, mem_file=None)  # the RAM comes from the snapshot
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.machine_spec = spec
        backend: Backend | None = None
        try:
            backend = self.backend_factory(spec)
            backend.start()
        except Exception as exc:
            _log.error("%s failed: %s", what, exc)
            if backend is not None:  # a QEMU that started but did not restore must not linger
                with contextlib.suppress(Exception):
                    backend.stop(timeout=0.5)
            raise Fault(f"Failed to {what} the microVM: {exc}") from None
        self.backend = backend
        self.state = RUNNING
        self._start_guest_mmds()
        threading.Thread(target=self._watch, name="fc-mock-watch", daemon=True).start()

    def _start_guest_mmds(self) -> None:
        mc = self.config.mmds_config
        if mc is None or self.guest_mmds_factory is None:
            return
        iface = self.config.ifaces.get(mc["network_interfaces"][0])
        if iface is None:
            return
        try:
            self.guest_mmds = self.guest_mmds_factory(
                mc["ipv4_address"], iface["host_dev_name"], lambda: self.mmds or {}, mc["version"]
            )
        except Exception as exc:  # the guest then cannot reach MMDS; Firecracker would not fail here
            _log.error("MMDS for the guest unavailable on %s: %s", iface["host_dev_name"], exc)

    def _watch(self) -> None:
        assert self.backend is not None
        code = self.backend.wait()
        _log.info("guest exited (hypervisor exit code %s)", code)
        self.shutdown(0)

    def _ctrl_alt_del(self) -> None:
        backend = self.backend
        if backend is None:  # loaded, never resumed: no guest runs to see the key press
            _log.info("SendCtrlAltDel to a microVM that was loaded and not resumed: nothing to do")
            return
        send = getattr(backend, "send_ctrl_alt_del", None) or getattr(backend, "powerdown", None)
        if callable(send):
            send()
        else:
            threading.Thread(target=backend.stop, kwargs={"timeout": 30.0}, name="fc-mock-cad",
                             daemon=True).start()

    def shutdown(self, code: int, *, force: bool = False) -> None:
        """Stop the guest (if any), undo the MMDS address, then report the exit code once."""
        with self._lock:
            if self._exited:
                return
            self._exited = True
        if self.backend is not None:
            try:
                self.backend.stop(timeout=0.5 if force else 5.0)
            except Exception as exc:
                _log.error("stopping the guest: %s", exc)
        if self.guest_mmds is not None:
            self.guest_mmds.close()
        if self.on_exit is not None:
            self.on_exit(code)


def _minor(version: str) -> tuple[str, ...]:
    """"1.16.1" -> ("1", "16"): Firecracker's snapshot format changes with its minor version."""
    return tuple(version.split(".")[:2])


def _interface_exists(name: str) -> bool:
    """In *this* network namespace: /sys/class/net would show the namespace that mounted /sys, which is the
    host's when we were started with `nsenter --net`."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
