"""fc-agent: the guest's PID 1. Reads its plan, runs the container, serves exec, reports to the host.

Boot contract: the initramfs switches root to `python3 -m fc_agent` with the kernel command line's
`fcvm_*` words as environment variables: `fcvm_plan=mmds|channel` says where the plan comes from.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path

from fc_agent import container, exec_server, mmds, network, system
from fc_agent.channel import Channel, open_channel
from fc_agent.host_link import HostLink, receive_credential
from fcvm_wire import ports
from fcvm_wire.control import (
    MAX_DETAIL,
    ContainerState,
    ControlError,
    HealthReport,
    HealthState,
    LogStream,
    Message,
    Status,
    fit_text,
    log_messages,
)
from fcvm_wire.plan import Plan, PlanError

AGENT_VERSION = "1"
VOLUME_ROOT = Path("/run/fcvm/volumes")
PLAN_TIMEOUT = 3600
_log = logging.getLogger("fc_agent")


def boot_param(name: str) -> str:
    """A `fcvm_<name>=value` word of the kernel command line (init passes them on as environment)."""
    return os.environ.get(f"fcvm_{name}", "")


class _ControlHandler(logging.Handler):
    """Agent log lines also travel to the host, which prefixes them with the VM name."""

    def __init__(self) -> None:
        super().__init__()
        self.link: HostLink | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.link is not None:
            for message in log_messages(LogStream.AGENT, self.format(record)):
                self.link.send(message)


_to_host = _ControlHandler()


def _setup_logging() -> None:
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("fc-agent: %(message)s"))
    _to_host.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("fc_agent")
    root.handlers[:] = [console, _to_host]
    root.setLevel(logging.DEBUG if boot_param("debug") else logging.INFO)
    root.propagate = False


def _read_prepare(link: HostLink) -> Plan:
    """What to prepare before the run: the image and the network (Firecracker: from MMDS)."""
    if boot_param("plan") == "mmds":
        network.link_up()
        if boot_param("net"):
            network.configure_early(boot_param("net"))
        network.route_mmds(mmds.MMDS_ADDRESS)
        return Plan.from_json(mmds.fetch("/"))
    return _wait(link.prepares, "what to prepare")


def _wait(plans: queue.Queue[Plan], what: str) -> Plan:
    # A pre-start snapshot may sit between the two steps for a long time: a restore then brings the plan.
    try:
        return plans.get(timeout=PLAN_TIMEOUT)
    except queue.Empty:
        raise PlanError(f"the host sent no {what} within {PLAN_TIMEOUT} s") from None


def _mount_volumes(link: HostLink, plan: Plan) -> list[tuple[str, str, bool]]:
    mounts: list[tuple[str, str, bool]] = []
    if not plan.volumes:
        return mounts
    from fcvm_wire.fusepipe import start_relay

    for index, volume in enumerate(plan.volumes):
        mountpoint = VOLUME_ROOT / str(index)
        mountpoint.mkdir(parents=True, exist_ok=True)
        start_relay(
            lambda port=volume.port: link.connect(port),  # type: ignore[misc]
            str(mountpoint), readers=2, read_only=volume.read_only,
        )
        mounts.append((str(mountpoint), volume.guest_path, volume.read_only))
        _log.info("volume %s mounted over port %d", volume.guest_path, volume.port)
    return mounts


class _Reporter:
    """The container's state as last reported, so a restored agent can report it again to its new host side."""

    def __init__(self, link: HostLink, image_ref: str, has_healthcheck: bool | None) -> None:
        self.link = link
        self.image_ref = image_ref
        self.has_healthcheck = has_healthcheck
        self.running = False
        self.health: HealthState | None = None
        link.current_state = self.state

    def state(self) -> list[Message]:
        messages: list[Message] = [Status(ContainerState.RUNNING)] if self.running else []
        return messages + ([HealthReport(self.health)] if self.health else [])

    def set_running(self) -> None:
        self.running = True
        self.link.send(Status(ContainerState.RUNNING))

    def follow_health(self, stop: threading.Event) -> None:
        if self.has_healthcheck is None:  # a pulled image: podman has it now
            self.has_healthcheck = container.image_has_healthcheck(self.image_ref) is True
        if not self.has_healthcheck:
            self._set_health(HealthState.HEALTHY)
            return
        while not stop.wait(2.0):
            self._set_health(HealthState.HEALTHY if container.healthcheck() else HealthState.UNHEALTHY)

    def _set_health(self, health: HealthState) -> None:
        if health != self.health:
            self.health = health
            self.link.send(HealthReport(health))


def run_plan(channel: Channel, link: HostLink) -> int:
    prepare = _read_prepare(link)
    if boot_param("plan") != "mmds":
        network.link_up()
    network.configure(prepare.network)
    listener = channel.listen(ports.GUEST_EXEC)
    threading.Thread(target=exec_server.serve, args=(listener,), daemon=True, name="exec").start()
    link.send(Status(ContainerState.STARTING, detail="loading image"))
    container.load_image(prepare)
    has_healthcheck = container.image_has_healthcheck(prepare.image.ref)
    link.send(Status(ContainerState.PREPARED))
    plan = _wait(link.plans, "plan")
    _log.info("plan for %s: image %s", plan.name, plan.image.ref)
    network.set_hostname(plan.hostname or plan.name)
    mounts = _mount_volumes(link, plan)
    container.start(plan, mounts)
    reporter = _Reporter(link, plan.image.ref, has_healthcheck)
    reporter.set_running()

    def send_output(stream: LogStream, line: str) -> None:
        for message in log_messages(stream, line):
            link.send(message)

    ended = threading.Event()
    logs = container.follow_logs(send_output, ended)
    stop = threading.Event()
    threading.Thread(target=reporter.follow_health, args=(stop,), daemon=True).start()
    link.on_shutdown = _stop_container
    code = container.wait()
    ended.set()
    stop.set()
    logs.join(timeout=10)  # every line must reach the host before the exit does
    link.send(Status(ContainerState.EXITED, code))
    return code


def _stop_container(timeout: int) -> None:
    _log.info("host asked to stop the container (timeout %d s)", timeout)
    container.stop(timeout)


def main() -> int:
    _setup_logging()
    pid1 = os.getpid() == 1
    if pid1:
        system.boot_mounts()
        system.start_orphan_reaper()
    channel = open_channel()
    try:
        credential = receive_credential(channel, PLAN_TIMEOUT)
    except OSError as exc:  # the host never delivered it: it gave up on this VM long ago
        _log.error("no credential from the host: %s", exc)
        if pid1:
            system.power_off()
        return 125
    link = HostLink(channel, AGENT_VERSION, credential)
    link.start()
    _to_host.link = link
    try:
        code = run_plan(channel, link)
    except Exception as exc:  # PID 1 must never die with a traceback: that panics the guest
        _log.error("failed: %s", exc,
                   exc_info=not isinstance(exc, (PlanError, ControlError, container.ContainerError)))
        link.send(Status(ContainerState.FAILED, detail=fit_text(str(exc), MAX_DETAIL)))
        code = 125
    link.close()
    if pid1:
        # Give the host a moment to read the final status before the VM disappears.
        time.sleep(0.2)
        system.power_off()
    return code
