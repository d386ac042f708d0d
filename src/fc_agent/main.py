"""fc-agent: the guest's PID 1. Reads its plan, runs the container, serves exec, reports to the host.

Boot contract: the initramfs switches root to `python3 -m fc_agent` with the kernel command line's
`fcvm_*` words as environment variables: `fcvm_plan=mmds|channel` says where the plan comes from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

from fc_agent import container, exec_server, mmds, network, system
from fc_agent.channel import Channel, open_channel
from fcvm_wire import control as wire
from fcvm_wire import ports
from fcvm_wire.plan import Plan, PlanError

AGENT_VERSION = "1"
VOLUME_ROOT = Path("/run/fcvm/volumes")
_log = logging.getLogger("fc_agent")


def boot_param(name: str) -> str:
    """A `fcvm_<name>=value` word of the kernel command line (init passes them on as environment)."""
    return os.environ.get(f"fcvm_{name}", "")


class _ControlHandler(logging.Handler):
    """Agent log lines also travel to the host, which prefixes them with the VM name."""

    def __init__(self) -> None:
        super().__init__()
        self.control: wire.ControlStream | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.control is not None:
            try:
                for message in wire.log_messages(wire.LogStream.AGENT, self.format(record)):
                    self.control.send(message)
            except OSError:
                self.control = None


_to_host = _ControlHandler()


def _setup_logging() -> None:
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("fc-agent: %(message)s"))
    _to_host.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("fc_agent")
    root.handlers[:] = [console, _to_host]
    root.setLevel(logging.DEBUG if boot_param("debug") else logging.INFO)
    root.propagate = False


def _connect_control(channel: Channel, timeout: float = 60.0) -> wire.ControlStream:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return wire.ControlStream(channel.connect(ports.HOST_CONTROL))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _read_plan(control: wire.ControlStream) -> Plan:
    if boot_param("plan") == "mmds":
        network.link_up()
        if boot_param("net"):
            network.configure_early(boot_param("net"))
        network.route_mmds(mmds.MMDS_ADDRESS)
        return Plan.from_json(mmds.fetch("/"))
    # A bad plan message raises ControlError: the host is trusted, so it is a bug worth failing on.
    while (message := control.receive()) is not None:
        if isinstance(message, wire.PlanMessage):
            return message.plan
    raise PlanError("the host closed the control channel before sending a plan")


def _mount_volumes(channel: Channel, plan: Plan) -> list[tuple[str, str, bool]]:
    mounts: list[tuple[str, str, bool]] = []
    if not plan.volumes:
        return mounts
    from fcvm_wire.fusepipe import start_relay

    for index, volume in enumerate(plan.volumes):
        mountpoint = VOLUME_ROOT / str(index)
        mountpoint.mkdir(parents=True, exist_ok=True)
        start_relay(
            lambda port=volume.port: channel.connect(port),  # type: ignore[misc]
            str(mountpoint), readers=2, read_only=volume.read_only,
        )
        mounts.append((str(mountpoint), volume.guest_path, volume.read_only))
        _log.info("volume %s mounted over port %d", volume.guest_path, volume.port)
    return mounts


def _report_health(control: wire.ControlStream, stop: threading.Event) -> None:
    if not container.has_healthcheck():
        control.send(wire.HealthReport(wire.HealthState.HEALTHY))
        return
    last = None
    while not stop.wait(2.0):
        health = wire.HealthState.HEALTHY if container.healthcheck() else wire.HealthState.UNHEALTHY
        if health != last:
            control.send(wire.HealthReport(health))
            last = health


def _follow_host(control: wire.ControlStream) -> None:
    """Requests from the host after the plan: `shutdown` stops the container like `podman stop`."""
    while True:
        try:
            message = control.receive()
        except wire.ControlError as exc:
            _log.warning("control stream: %s", exc)
            continue
        except OSError as exc:
            _log.warning("control stream: %s", exc)
            return
        if message is None:
            return
        if isinstance(message, wire.Shutdown):
            _log.info("host asked to stop the container (timeout %d s)", message.timeout)
            container.stop(message.timeout)


def run_plan(channel: Channel, control: wire.ControlStream) -> int:
    plan = _read_plan(control)
    _log.info("plan for %s: image %s", plan.name, plan.image.ref)
    if boot_param("plan") != "mmds":
        network.link_up()
    network.configure(plan.network)
    network.set_hostname(plan.hostname or plan.name)
    listener = channel.listen(ports.GUEST_EXEC)
    threading.Thread(target=exec_server.serve, args=(listener,), daemon=True, name="exec").start()
    control.send(wire.Status(wire.ContainerState.STARTING, detail="loading image"))
    mounts = _mount_volumes(channel, plan)
    container.load_image(plan)
    container.start(plan, mounts)
    control.send(wire.Status(wire.ContainerState.RUNNING))

    def send_output(stream: wire.LogStream, line: str) -> None:
        for message in wire.log_messages(stream, line):
            control.send(message)

    logs = container.stream_logs(send_output)
    stop = threading.Event()
    threading.Thread(target=_report_health, args=(control, stop), daemon=True).start()
    threading.Thread(target=_follow_host, args=(control,), daemon=True, name="control").start()
    code = container.wait()
    stop.set()
    logs.join(timeout=10)  # `podman logs -f` ends with the container; every line must reach the host first
    control.send(wire.Status(wire.ContainerState.EXITED, code))
    return code


def main() -> int:
    _setup_logging()
    pid1 = os.getpid() == 1
    if pid1:
        system.boot_mounts()
        system.start_orphan_reaper()
    channel = open_channel()
    control = _connect_control(channel)
    _to_host.control = control
    control.send(wire.Hello(AGENT_VERSION, 0))
    try:
        code = run_plan(channel, control)
    except Exception as exc:  # PID 1 must never die with a traceback: that panics the guest
        _log.error("failed: %s", exc,
                   exc_info=not isinstance(exc, (PlanError, wire.ControlError, container.ContainerError)))
        with contextlib.suppress(OSError):
            control.send(wire.Status(wire.ContainerState.FAILED, detail=wire.fit_text(str(exc), wire.MAX_DETAIL)))
        code = 125
    if pid1:
        # Give the host a moment to read the final status before the VM disappears.
        time.sleep(0.2)
        system.power_off()
    return code
