"""The host end of the agent's control stream (hello, plan, status, health, logs, shutdown) and health polling."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from fcvm.core.kinds import Health
from fcvm.core.terminal import neutralise
from fcvm.run.agent_gate import AgentGate
from fcvm.run.container_log import ContainerLog
from fcvm_wire.checks import printable
from fcvm_wire.control import (
    MAX_SHUTDOWN_TIMEOUT,
    ContainerState,
    ControlError,
    ControlStream,
    HealthReport,
    Hello,
    Log,
    LogStream,
    Message,
    PlanMessage,
    PrepareMessage,
    Restore,
    Restored,
    Shutdown,
    Status,
)
from fcvm_wire.plan import Plan

# A guest that sends this many malformed messages on one connection is cut off: it is broken or hostile, and
# logging every one would let it fill the host's log.
MAX_BAD_MESSAGES = 20


def start_thread(target: Callable[..., object], *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


class AgentLink:
    """What the agent tells the host about its container, and what the host tells the agent: how to prepare,
    what to run, that it was restored, and to stop.

    A cold boot: hello -> `prepare` (QEMU; Firecracker's agent reads it from MMDS) -> the agent loads the image
    and says `prepared` -> `on_prepared()` (a pre-start snapshot may be taken here) -> the run's `plan`.
    A restore: hello -> `restore` (the wall clock) -> `restored` -> the run's `plan` if the snapshot was taken
    before the run (`plan` is None for a snapshot of a running container).

    `on_stage(name)` is called once per stage reached ("agent_connected", "prepared", "restored",
    "container_running"); `on_health` for every health change the agent reports (unless the host polls a health
    URL itself).

    Only connections that start with the VM's `credential` are heard (run/agent_gate.py): anything else in the
    guest that reaches the control port can neither report nor receive anything.
    """

    def __init__(self, *, plan: Plan | None, prepare: Plan | None, restored: bool, credential: bytes,
                 container_log: ContainerLog, echo_output: bool, agent_reports_health: bool,
                 on_stage: Callable[[str], None], on_health: Callable[[Health], None], logger: logging.Logger,
                 on_prepared: Callable[[], None] = lambda: None) -> None:
        self.plan = plan
        self.credential = credential
        self.prepare = prepare
        self.restored = restored
        self.on_prepared = on_prepared
        self.container_log = container_log
        self.echo_output = echo_output
        self.agent_reports_health = agent_reports_health
        self.on_stage = on_stage
        self.on_health = on_health
        self.log = logger
        self.exit_code: int | None = None
        self.failure: str | None = None
        self.container_running = threading.Event()
        self.container_done = threading.Event()  # exited or failed
        self._control: ControlStream | None = None

    def accept_forever(self, listener: socket.socket, stop: threading.Event) -> None:
        """Serve every connection to the control port that proves the credential, until the listener closes (the
        agent reconnects after a channel reset)."""
        gate = AgentGate(listener, self.credential, name="control port", logger=self.log)

        def accept_loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = gate.accept()
                except OSError:
                    return
                start_thread(self._session, ControlStream(conn))

        start_thread(accept_loop)

    def _session(self, control: ControlStream) -> None:
        """One connection. The guest is untrusted: a malformed message is logged (ControlError's text escapes
        whatever it quotes) and skipped, and the connection is dropped after MAX_BAD_MESSAGES of them."""
        self._control = control
        bad = 0
        try:
            while True:
                try:
                    message = control.receive()
                except ControlError as exc:
                    bad += 1
                    self.log.warning("agent sent a bad control message: %s", exc)
                    if bad >= MAX_BAD_MESSAGES:
                        self.log.warning("dropping the agent's control connection after %d bad messages", bad)
                        return
                    continue
                if message is None:
                    return
                self._on_message(control, message)
        except OSError as exc:
            self.log.warning("agent control stream: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                control.close()

    def _on_message(self, control: ControlStream, message: Message) -> None:
        match message:
            case Hello():
                self.on_stage("agent_connected")
                if self.restored:
                    control.send(Restore(time.time()))
                elif self.prepare is not None:  # once: an agent that reconnects after a channel reset has it
                    prepare, self.prepare = self.prepare, None
                    control.send(PrepareMessage(prepare))
            case Restored():
                self.on_stage("restored")
                self._send_plan(control)
            case Log():
                self._on_log(message)
            case Status():
                self._on_status(message)
            case HealthReport():
                if self.agent_reports_health:
                    self.on_health(Health(message.health.value))
            case PlanMessage() | PrepareMessage() | Restore() | Shutdown():
                self.log.warning("agent sent a %s message, which only the host sends", message.TYPE)

    def _on_log(self, message: Log) -> None:
        if message.stream == LogStream.AGENT:
            # Into the host's own log: escaped, so the guest cannot forge log lines or drive a terminal.
            self.log.info("agent: %s", printable(message.line))
            return
        # The container's output, like `podman run` prints it; on a terminal, shown but never obeyed.
        self.container_log.write_line(message.line)
        if self.echo_output:
            out = sys.stdout if message.stream == LogStream.STDOUT else sys.stderr
            line = message.line + "\n"  # whole, so that a CRLF line ending stays one
            print(neutralise(line) if out.isatty() else line, end="", file=out, flush=True)

    def _on_status(self, status: Status) -> None:
        if self.container_done.is_set():
            # The first exit code or failure is the container's; the row must not change after it.
            self.log.warning("agent reported %s after the container had ended; ignored", status.state)
            return
        self.log.debug("agent status %s", status.state)
        match status.state:
            case ContainerState.PREPARED:
                self.on_stage("prepared")
                self.on_prepared()
                self._send_plan(self._control)
            case ContainerState.RUNNING:
                self.on_stage("container_running")
                self.container_running.set()
            case ContainerState.EXITED:
                self.exit_code = status.exit_code
                self.log.info("container exited with code %d", self.exit_code)
                self.container_done.set()
            case ContainerState.FAILED:
                self.failure = printable(status.detail) or "the guest agent failed"
                self.container_done.set()

    def _send_plan(self, control: ControlStream | None) -> None:
        plan, self.plan = self.plan, None  # once
        if plan is not None and control is not None:
            control.send(PlanMessage(plan))

    def stop_container(self, grace: float, reason: str) -> None:
        """Like `podman stop`: the agent sends the container SIGTERM, then SIGKILL after `grace`; wait for its exit
        code so the row records it."""
        control = self._control
        if control is None:
            return
        self.log.info("stopping the container (%s)", reason)
        try:
            control.send(Shutdown(min(int(grace), MAX_SHUTDOWN_TIMEOUT)))
        except OSError:
            return
        self.container_done.wait(grace + 5)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect answers the check; following it would let the guest make the host request any URL."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def poll_health(target: str, stop: threading.Event, on_health: Callable[[Health], None],
                logger: logging.Logger) -> None:
    """Poll `target` (the health URL rewritten to its published host endpoint) every second until `stop`."""
    opener = urllib.request.build_opener(_NoRedirect)
    last: Health | None = None
    while not stop.is_set():
        try:
            with opener.open(target, timeout=2) as response:
                health = Health.HEALTHY if 200 <= response.status < 400 else Health.UNHEALTHY
        except urllib.error.HTTPError as exc:  # the server answered: a redirect (not followed) or an error
            health = Health.HEALTHY if 300 <= exc.code < 400 else Health.UNHEALTHY
        except OSError:  # nothing answers yet: still starting, unless it was up before
            health = Health.STARTING if last in (None, Health.STARTING) else Health.UNHEALTHY
        if health != last:
            on_health(health)
            logger.info("health: %s", health)
            last = health
        stop.wait(1.0)


def published_health_target(health_url: str, published: list[tuple[str, int, Any]]) -> str | None:
    """The health URL pointed at the host endpoint that publishes its port, or None when none does."""
    url = urllib.parse.urlsplit(health_url)
    guest_port = url.port or (443 if url.scheme == "https" else 80)
    endpoint = next(((ip, port) for ip, port, mapping in published
                     if mapping.guest_port == guest_port and mapping.protocol == "tcp"), None)
    if endpoint is None:
        return None
    return url._replace(netloc=f"{endpoint[0]}:{endpoint[1]}").geturl()
