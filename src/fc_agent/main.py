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
from fc_agent.host_link import HostLink
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
        self.link: HostLink | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.link is not None:
            self.link.send({"type": "log", "stream": "agent", "line": self.format(record)})


_to_host = _ControlHandler()


def _setup_logging() -> None:
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("fc-agent: %(message)s"))
    _to_host.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("fc_agent")
    root.handlers[:] = [console, _to_host]
    root.setLevel(logging.DEBUG if boot_param("debug") else logging.INFO)
    root.propagate = False


def _read_plan(link: HostLink) -> Plan:
    if boot_param("plan") == "mmds":
        network.link_up()
        if boot_param("net"):
            network.configure_early(boot_param("net"))
        network.route_mmds(mmds.MMDS_ADDRESS)
        return Plan.from_dict(mmds.fetch("/"))
    try:
        return Plan.from_dict(link.plans.get(timeout=600))
    except queue.Empty:
        raise PlanError("the host sent no plan within 600 s") from None


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


class _Reporter:
    """The container's state as last reported, so a restored agent can report it again to its new host side."""

    def __init__(self, link: HostLink) -> None:
        self.link = link
        self.running = False
        self.health = ""
        link.current_state = self.state

    def state(self) -> list[dict[str, object]]:
        messages: list[dict[str, object]] = []
        if self.running:
            messages.append({"type": "status", "state": "running"})
        if self.health:
            messages.append({"type": "health", "health": self.health})
        return messages

    def set_running(self) -> None:
        self.running = True
        self.link.send({"type": "status", "state": "running"})

    def set_health(self, health: str) -> None:
        if health != self.health:
            self.health = health
            self.link.send({"type": "health", "health": health})

    def follow_health(self, stop: threading.Event) -> None:
        if not container.has_healthcheck():
            self.set_health("healthy")
            return
        while not stop.wait(2.0):
            self.set_health("healthy" if container.healthcheck() else "unhealthy")


def run_plan(channel: Channel, link: HostLink) -> int:
    plan = _read_plan(link)
    _log.info("plan for %s: image %s", plan.name, plan.image.ref)
    if boot_param("plan") != "mmds":
        network.link_up()
    network.configure(plan.network)
    network.set_hostname(plan.hostname or plan.name)
    listener = channel.listen(ports.GUEST_EXEC)
    threading.Thread(target=exec_server.serve, args=(listener,), daemon=True, name="exec").start()
    link.send({"type": "status", "state": "starting", "detail": "loading image"})
    mounts = _mount_volumes(channel, plan)
    container.load_image(plan)
    container.start(plan, mounts)
    reporter = _Reporter(link)
    reporter.set_running()
    logs = container.stream_logs(lambda stream, line: link.send({"type": "log", "stream": stream, "line": line}))
    stop = threading.Event()
    threading.Thread(target=reporter.follow_health, args=(stop,), daemon=True).start()
    link.on_shutdown = _stop_container
    code = container.wait()
    stop.set()
    logs.join(timeout=10)  # `podman logs -f` ends with the container; every line must reach the host first
    link.send({"type": "status", "state": "exited", "exit_code": code})
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
    link = HostLink(channel, AGENT_VERSION)
    link.start()
    _to_host.link = link
    try:
        code = run_plan(channel, link)
    except Exception as exc:  # PID 1 must never die with a traceback: that panics the guest
        _log.error("failed: %s", exc, exc_info=not isinstance(exc, (PlanError, container.ContainerError)))
        link.send({"type": "status", "state": "failed", "detail": str(exc)})
        code = 125
    link.close()
    if pid1:
        # Give the host a moment to read the final status before the VM disappears.
        time.sleep(0.2)
        system.power_off()
    return code
