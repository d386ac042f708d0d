"""`FirecrackerVm`: the `Hypervisor` backed by a Firecracker process (or fc-mock) and its REST API.

Launch: `<spec.enter_argv> firecracker --api-sock <workdir>/firecracker.sock --id <name> --level Info`
in its own session (so the whole process group can be reaped); with a `Jail`, the jailer's command
line instead, which execs Firecracker in the same process (see jail.py). stdout+stderr (guest serial console
and Firecracker's log, which goes to stdout without `--log-path`) re-logged line by line into
`spec.console_log` and the `fcvm.vm.<name>` logger with Firecracker's timestamp/instance prefix
stripped. Then: GET /version (1.12 to 1.16), boot-source, machine-config, drives,
network-interfaces, vsock, mmds/config + PUT /mmds, InstanceStart.

Any failure before the guest runs (no socket, process died, a 400) raises a `FirecrackerError`
naming the cause and leaves nothing behind: the process group is killed and reaped and the API
and vsock sockets are unlinked.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from fcvm.core import log
from fcvm.core.errors import FcvmError
from fcvm.core.proc import ProcessRef, kill_group
from fcvm.vmm.base import MachineSpec
from fcvm.vmm.firecracker import models as m
from fcvm.vmm.firecracker.client import Client, FirecrackerConnectionError, FirecrackerError
from fcvm.vmm.firecracker.jail import API_SOCKET, Jail

_log = log.get("vmm.firecracker")

IFACE_ID = "eth0"
MMDS_ADDRESS = "169.254.169.254"
_SOCKET_NAME = "firecracker.sock"
_UNIX_PATH_MAX = 107


class _TailSink:
    """The VM log file, remembering the last lines for error messages."""

    def __init__(self, path: Path, keep: int = 20) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.tail.extend(line for line in text.splitlines() if line)
            if not self._file.closed:
                self._file.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def summary(self, lines: int = 3) -> str:
        recent = list(self.tail)[-lines:]
        return "; ".join(recent) if recent else "no output"


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
        self._proc: subprocess.Popen[bytes] | None = None
        self._ref: ProcessRef | None = None
        self._client: Client | None = None
        self._sink: _TailSink | None = None
        self._relog: threading.Thread | None = None
        self._started = False  # InstanceStart accepted
        self._reaped = False
        self._logger = log.get(f"vm.{spec.name}")

    # -- Hypervisor protocol ------------------------------------------------------------------

    @property
    def process(self) -> ProcessRef:
        if self._ref is None:
            raise FcvmError(f"Firecracker for {self.spec.name} has not been started")
        return self._ref

    def start(self) -> None:
        if self._proc is not None:
            raise FcvmError(f"Firecracker for {self.spec.name} was already started")
        try:
            self._launch()
            self._wait_for_socket()
            self._boot()
        except BaseException:
            self._cleanup(graceful=False)
            raise

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        if self._reaped:
            return self._proc.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exited():
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return self._reap()

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
        self._sink = _TailSink(self.spec.console_log)
        argv = self.argv()
        _log.debug("launch: %s", " ".join(argv))
        try:
            # The caller's working directory: every path fcvm passes is absolute, and a relative one the user
            # put in the environment (FCVM_FC_SPEC=../shared/... for fc-mock) keeps meaning what they typed.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise FirecrackerError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        try:
            self._ref = ProcessRef.of(self._proc.pid)
        except ProcessLookupError:  # already gone and reaped by nobody yet: fall back to pid only
            self._ref = ProcessRef(self._proc.pid, 0)
        assert self._proc.stdout is not None
        self._relog = log.relog_in_thread(
            self._proc.stdout, self._logger, transform=log.strip_vmm_prefix, sink=cast(IO[str], self._sink)
        )

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + self.socket_timeout
        while True:
            if self._exited():
                code = self._reap()
                raise FirecrackerError(
                    f"Firecracker exited with code {code} before creating its API socket: {self._output()}"
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
                    f"within {self.socket_timeout:g} s: {self._output()}"
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
        for method, path, body in self.boot_requests():
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
                    f"Firecracker exited with code {code} during {what}: {self._output()}"
                ) from exc
            raise

    def _api(self) -> Client:
        if self._client is None or not self._started or self._reaped:
            raise FcvmError(f"{self.spec.name} is not running")
        return self._client

    # -- teardown -----------------------------------------------------------------------------

    def _exited(self) -> bool:
        """True once the process is a zombie or gone; does not reap (the pid stays reserved)."""
        assert self._proc is not None
        if self._reaped:
            return True
        try:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _reap(self) -> int:
        """Kill what is left of the process group (e.g. fc-mock's QEMU), reap, finish the log."""
        assert self._proc is not None
        if not self._reaped:
            kill_group(self._proc.pid)
            self._proc.wait()
            self._reaped = True
            if self._relog is not None:
                self._relog.join(timeout=5)
        return self._proc.returncode

    def _output(self) -> str:
        if self._relog is not None and self._exited():
            self._relog.join(timeout=2)
        return self._sink.summary() if self._sink else "no output"

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        if not self._exited():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _cleanup(self, *, graceful: bool, timeout: float = 10.0) -> None:
        if self._proc is not None and not self._reaped:
            if graceful and self._started and self._client is not None and not self._exited():
                try:
                    self._client.put(m.ACTIONS, m.InstanceActionInfo("SendCtrlAltDel"))
                except FirecrackerError as exc:
                    _log.debug("SendCtrlAltDel failed: %s", exc)
                else:
                    self._wait_exit(timeout)
            if not self._exited():
                self._signal(signal.SIGTERM)
                if not self._wait_exit(5.0 if graceful else 2.0):
                    self._signal(signal.SIGKILL)
            self._reap()
        if self._client is not None:
            self._client.close()
        if self._sink is not None:
            self._sink.close()
        for path in (self.api_socket, self.spec.vsock_uds):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
