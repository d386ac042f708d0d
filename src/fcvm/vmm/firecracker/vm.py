"""`FirecrackerVm`: the `Hypervisor` backed by a Firecracker process (or fc-mock) and its REST API.

Launch: `<spec.enter_argv> firecracker --api-sock <workdir>/firecracker.sock --id <name> --level Info`
in its own session (so the whole process group can be reaped); with a `Jail`, the jailer's command
line instead, which execs Firecracker in the same process (see jail.py). stdout+stderr (guest serial console
and Firecracker's log, which goes to stdout without `--log-path`) re-logged line by line into
`spec.console_log` and the `fcvm.vm.<name>` logger with Firecracker's timestamp/instance prefix
stripped. Then: GET /version (1.12 to 1.16), boot-source, machine-config, drives,
network-interfaces, vsock, mmds/config + PUT /mmds, InstanceStart.

A clone (`spec.restore`) is loaded instead, in the fresh process, as Firecracker needs it:
- `PUT /snapshot/load` with `resume_vm: false`, the memory backend (File: the snapshot's memory file, mapped
  privately; Uffd: the page server's socket, which gets Firecracker's handshake), `network_overrides` (the
  clone's TAP; same name, its own network namespace) and `vsock_override` (the clone's own vsock socket);
- `PATCH /drives/{id}` for every drive: Firecracker reopens the drives at the paths baked into the snapshot,
  the source's, and this moves each to the clone's own file before the guest runs again. So the load needs the
  source's drive files to exist still (Firecracker fails to open them otherwise);
- `PATCH /vm Resumed`.
Version gates: `vsock_override` exists from 1.16 on. Older versions bake the source's vsock path in with no
override; a clone there would need a private mount namespace holding that path, which fcvm does not build, so
it refuses to restore on them. `network_overrides` (1.12+) is always there. A snapshot loads only into the
Firecracker minor version that wrote it. Nothing is sent to MMDS: its data store does not survive a load, and
the agent reads its plan from MMDS only at boot; a restored agent reconnects its control stream by itself and
the host answers `restored`. `clock_realtime` is not sent either: the agent resyncs the clock on `restored`.

Any failure before the guest runs (no socket, process died, a 400) raises a `FirecrackerError`
naming the cause and leaves nothing behind: the process group is killed and reaped and the API
and vsock sockets are unlinked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcvm.core import log
from fcvm.core.errors import FcvmError
from fcvm.core.proc import ProcessRef, SpawnError
from fcvm.vmm.base import MachineSpec, MemBackend, RestoreSpec
from fcvm.vmm.firecracker import models as m
from fcvm.vmm.firecracker.client import Client, FirecrackerConnectionError, FirecrackerError
from fcvm.vmm.firecracker.jail import API_SOCKET, Jail
from fcvm.vmm.process import VmmProcess

_log = log.get("vmm.firecracker")

IFACE_ID = "eth0"
MMDS_ADDRESS = "169.254.169.254"
_SOCKET_NAME = "firecracker.sock"
_UNIX_PATH_MAX = 107


def instance_id(name: str) -> str:
    """Firecracker's `--id` allows [A-Za-z0-9-], at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9-]", "-", name)[:64] or "fcvm"


class FirecrackerVm:
    """A microVM run by Firecracker. `name` becomes "firecracker (fc-mock)" when the API says so."""

    def __init__(
        self,
        spec: MachineSpec,
        *,
        binary: Path,
        mmds: dict[str, Any] | None,
        jail: Jail | None = None,
        socket_timeout: float = 10.0,
        api_timeout: float = 30.0,
        log_level: str = "Info",
    ) -> None:
        if mmds is not None and spec.tap is None:
            raise FcvmError("MMDS needs a network interface, but this VM has no TAP device")
        self.spec = spec
        self.binary = Path(binary)
        self.mmds = mmds
        self.jail = jail
        self.name = "firecracker"
        self.api_socket = jail.api_socket if jail else spec.workdir / _SOCKET_NAME
        for path in (self.api_socket, spec.vsock_uds):
            if path is not None and len(os.fsencode(path)) > _UNIX_PATH_MAX:
                raise FcvmError(f"socket path too long for a Unix socket ({len(str(path))} bytes): {path}",
                                hint="use a shorter FCVM_DATA_DIR")
        self.socket_timeout = socket_timeout
        self.api_timeout = api_timeout
        self.log_level = log_level
        self.version: str | None = None
        self._client: Client | None = None
        self.marks: dict[str, float] = {}
        self._started = False  # InstanceStart accepted
        self._vmm = VmmProcess(self.argv(), console=spec.console_log, logger=log.get(f"vm.{spec.name}"),
                               level=logging.INFO, transform=log.strip_vmm_prefix)

    # -- Hypervisor protocol ------------------------------------------------------------------

    @property
    def process(self) -> ProcessRef:
        ref = self._vmm.ref
        if ref is None:
            raise FcvmError(f"Firecracker for {self.spec.name} has not been started")
        return ref

    def start(self) -> None:
        if self._vmm.child is not None:
            raise FcvmError(f"Firecracker for {self.spec.name} was already started")
        try:
            self._launch()
            self._wait_for_socket()
            self._boot()
        except BaseException:
            self._cleanup(graceful=False)
            raise

    def wait(self, timeout: float | None = None) -> int | None:
        return self._vmm.wait(timeout)

    def pause(self) -> None:
        self._api().patch(m.VM, m.Vm("Paused"))

    def resume(self) -> None:
        self._api().patch(m.VM, m.Vm("Resumed"))

    def stop(self, timeout: float = 10.0) -> None:
        self._cleanup(graceful=True, timeout=timeout)

    # -- launch -------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        if self.jail is not None:  # the jailer joins the netns itself and passes --id
            return self.jail.argv(["--api-sock", API_SOCKET, "--level", self.log_level])
        return [
            *self.spec.enter_argv,
            str(self.binary),
            "--api-sock", str(self.api_socket),
            "--id", instance_id(self.spec.name),
            "--level", self.log_level,
        ]

    def api_path(self, path: Path) -> str:
        """A host path as the (possibly jailed) Firecracker must be told it."""
        return self.jail.inside(path) if self.jail else str(path)

    def _launch(self) -> None:
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        # Firecracker refuses to start if the API socket exists, and binds the vsock path at PUT time.
        for stale in (self.api_socket, self.spec.vsock_uds):
            if stale is not None:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        try:
            self._vmm.start()
        except SpawnError as exc:
            raise FirecrackerError(str(exc)) from exc

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + self.socket_timeout
        while True:
            if self._vmm.exited():
                code = self._vmm.wait()
                raise FirecrackerError(
                    f"Firecracker exited with code {code} before creating its API socket: {self._vmm.output()}"
                )
            if self.api_socket.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.api_socket))
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            if time.monotonic() >= deadline:
                raise FirecrackerError(
                    f"Firecracker did not create its API socket {self.api_socket} "
                    f"within {self.socket_timeout:g} s: {self._vmm.output()}"
                )
            time.sleep(0.02)

    def _boot(self) -> None:
        spec = self.spec
        self._client = client = Client(self.api_socket, timeout=self.api_timeout)
        self._guard(f"GET {m.VERSION}", client.negotiate)
        self.version = client.version_text
        if client.is_mock:
            self.name = "firecracker (fc-mock)"
        _log.info("%s %s for %s", self.name, self.version, spec.name)
        if spec.restore is not None:
            self._check_snapshot_version(spec.restore)
            requests = self.restore_requests(spec.restore)
        else:
            requests = self.boot_requests()
        for method, path, body in requests:
            self._request(method, path, body)
        self._started = True

    def boot_requests(self) -> list[tuple[str, str, m.Model | dict[str, Any]]]:
        """The configuration requests, in order, ending with InstanceStart."""
        spec = self.spec
        steps: list[tuple[str, str, m.Model | dict[str, Any]]] = []
        steps.append(("PUT", m.BOOT_SOURCE, m.BootSource(
            kernel_image_path=self.api_path(spec.kernel),
            boot_args=spec.boot_args,
            initrd_path=self.api_path(spec.initrd) if spec.initrd else None,
        )))
        steps.append(("PUT", m.MACHINE_CONFIG, m.MachineConfiguration(
            vcpu_count=spec.vcpus, mem_size_mib=spec.mem_mib, smt=False,
        )))
        for drive in spec.drives:
            steps.append(("PUT", m.drive_path(drive.drive_id), m.Drive(
                drive_id=drive.drive_id,
                is_root_device=drive.root,
                path_on_host=self.api_path(drive.path),
                is_read_only=drive.read_only,
                cache_type="Unsafe",
                io_engine="Sync",
            )))
        if spec.tap:
            steps.append(("PUT", m.iface_path(IFACE_ID), m.NetworkInterface(
                iface_id=IFACE_ID, host_dev_name=spec.tap, guest_mac=spec.guest_mac,
            )))
        if spec.vsock_uds:
            steps.append(("PUT", m.VSOCK, m.Vsock(guest_cid=spec.guest_cid, uds_path=self.api_path(spec.vsock_uds))))
        if self.mmds is not None:
            steps.append(("PUT", m.MMDS_CONFIG, m.MmdsConfig(
                network_interfaces=[IFACE_ID], version="V2", ipv4_address=MMDS_ADDRESS,
            )))
            steps.append(("PUT", m.MMDS, self.mmds))
        steps.append(("PUT", m.ACTIONS, m.InstanceActionInfo("InstanceStart")))
        return steps

    def restore_requests(self, restore: RestoreSpec) -> list[tuple[str, str, m.Model | dict[str, Any]]]:
        """Load the snapshot paused, move every drive to this VM's own file, resume."""
        spec = self.spec
        if restore.backend == MemBackend.UFFD:
            if restore.uffd_socket is None:
                raise FcvmError("a Uffd restore needs the page server's socket")
            memory = m.MemoryBackend(backend_type="Uffd", backend_path=self.api_path(restore.uffd_socket))
        else:
            memory = m.MemoryBackend(backend_type="File", backend_path=self.api_path(restore.memory))
        steps: list[tuple[str, str, m.Model | dict[str, Any]]] = []
        steps.append(("PUT", m.SNAPSHOT_LOAD, m.SnapshotLoadParams(
            snapshot_path=self.api_path(restore.state),
            mem_backend=memory,
            resume_vm=False,  # the drives still point at the source's files
            network_overrides=[m.NetworkOverride(iface_id=IFACE_ID, host_dev_name=spec.tap)] if spec.tap else None,
            vsock_override=m.VsockOverride(uds_path=self.api_path(spec.vsock_uds)) if spec.vsock_uds else None,
        )))
        for drive in spec.drives:
            steps.append(("PATCH", m.drive_path(drive.drive_id), m.PartialDrive(
                drive_id=drive.drive_id, path_on_host=self.api_path(drive.path),
            )))
        steps.append(("PATCH", m.VM, m.Vm("Resumed")))
        return steps

    def _check_snapshot_version(self, restore: RestoreSpec) -> None:
        """Firecracker's snapshot format changes with its minor version: refuse before loading, with the reason."""
        assert self._client is not None and self._client.version is not None
        if m.parse_version(restore.vmm_version) != self._client.version:
            raise FirecrackerError(
                f"the snapshot was taken by Firecracker {restore.vmm_version}, and this is {self.version}: "
                "it cannot load that snapshot format", hint="take the snapshot again with this Firecracker")

    def _request(self, method: str, path: str, body: m.Model | dict[str, Any] | None) -> Any:
        assert self._client is not None
        client = self._client
        return self._guard(f"{method} {path}", lambda: client.request(method, path, body))

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one API call; if the connection broke because Firecracker died, say so."""
        try:
            return call()
        except FirecrackerConnectionError as exc:
            code = self.wait(timeout=1.0)
            if code is not None:
                raise FirecrackerError(
                    f"Firecracker exited with code {code} during {what}: {self._vmm.output()}"
                ) from exc
            raise

    def _api(self) -> Client:
        if self._client is None or not self._started or self._vmm.exited():
            raise FcvmError(f"{self.spec.name} is not running")
        return self._client

    # -- teardown -----------------------------------------------------------------------------

    def _cleanup(self, *, graceful: bool, timeout: float = 10.0) -> None:
        if graceful and self._started and self._client is not None and not self._vmm.exited():
            try:
                self._client.put(m.ACTIONS, m.InstanceActionInfo("SendCtrlAltDel"))
            except FirecrackerError as exc:
                _log.debug("SendCtrlAltDel failed: %s", exc)
            else:
                self._vmm.wait(timeout)
        self._vmm.stop(5.0 if graceful else 2.0)
        if self._client is not None:
            self._client.close()
        for path in (self.api_socket, self.spec.vsock_uds):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
