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
from dataclasses import dataclass, field
from typing import Any

from fcvm.core.bounded_log import BoundedLog
from fcvm.core.kinds import Health
from fcvm.core.terminal import neutralise
from fcvm.run.agent_gate import AgentGate
from fcvm_wire import control as wire
from fcvm_wire.checks import printable
from fcvm_wire.plan import Plan

# A guest that sends this many malformed messages on one connection is cut off: it is broken or hostile, and
# logging every one would let it fill the host's log.
MAX_BAD_MESSAGES = 20
DEFAULT_STOP_GRACE = 10.0  # seconds, as `podman stop`: SIGTERM, then SIGKILL
STOP_SLACK = 30.0  # seconds past the stop timeout to wait for the container's exit code


def start_thread(target: Callable[..., object], *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


@dataclass(kw_only=True, eq=False)
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

    plan: Plan | None  # sent once the agent is prepared (or restored before the run); None: never
    prepare: Plan | None  # sent on the first hello (None: under Firecracker MMDS holds it, or a restore)
    restored: bool  # the agent wakes up in a snapshot and must catch up with the world
    credential: bytes
    container_log: BoundedLog
    echo_output: bool
    agent_reports_health: bool
    on_stage: Callable[[str], None]
    on_health: Callable[[Health], None]
    logger: logging.Logger
    on_prepared: Callable[[], None] = lambda: None
    exit_code: int | None = field(default=None, init=False)
    failure: str | None = field(default=None, init=False)
    container_running: threading.Event = field(default_factory=threading.Event, init=False)
    container_done: threading.Event = field(default_factory=threading.Event, init=False)  # exited or failed
    _control: wire.ControlStream | None = field(default=None, init=False, repr=False)

    def accept_forever(self, listener: socket.socket, stop: threading.Event) -> None:
        """Serve every connection to the control port that proves the credential, until the listener closes (the
        agent reconnects after a channel reset)."""
        gate = AgentGate(listener, self.credential, name="control port", logger=self.logger)

        def accept_loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = gate.accept()
                except OSError:
                    return
                start_thread(self._session, wire.ControlStream(conn))

        start_thread(accept_loop)

    def _session(self, control: wire.ControlStream) -> None:
        """One connection. The guest is untrusted: a malformed message is logged (ControlError's text escapes
        whatever it quotes) and skipped, and the connection is dropped after MAX_BAD_MESSAGES of them."""
        self._control = control
        bad = 0
        try:
            while True:
                try:
                    message = control.receive()
                except wire.ControlError as exc:
                    bad += 1
                    self.logger.warning("agent sent a bad control message: %s", exc)
                    if bad >= MAX_BAD_MESSAGES:
                        self.logger.warning("dropping the agent's control connection after %d bad messages", bad)
                        return
                    continue
                if message is None:
                    return
                self._on_message(control, message)
        except OSError as exc:
            self.logger.warning("agent control stream: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                control.close()

    def _on_message(self, control: wire.ControlStream, message: wire.Message) -> None:
        match message:
            case wire.Hello():
                self.on_stage("agent_connected")
                if self.restored:
                    control.send(wire.Restore(time.time()))
                elif self.prepare is not None:  # once: an agent that reconnects after a channel reset has it
                    prepare, self.prepare = self.prepare, None
                    control.send(wire.PrepareMessage(prepare))
            case wire.Restored():
                self.on_stage("restored")
                self._send_plan(control)
            case wire.Log():
                self._on_log(message)
            case wire.Status():
                self._on_status(message)
            case wire.HealthReport():
                if self.agent_reports_health:
                    self.on_health(Health(message.health.value))
            case wire.PlanMessage() | wire.PrepareMessage() | wire.Restore() | wire.Shutdown():
                self.logger.warning("agent sent a %s message, which only the host sends", message.TYPE)

    def _on_log(self, message: wire.Log) -> None:
        if message.stream == wire.LogStream.AGENT:
            # Into the host's own log: escaped, so the guest cannot forge log lines or drive a terminal.
            self.logger.info("agent: %s", printable(message.line))
            return
        # The container's output, like `podman run` prints it.
        self.container_log.write_line(message.line)
        if self.echo_output:  # on a terminal, shown but never obeyed
            out = sys.stdout if message.stream == wire.LogStream.STDOUT else sys.stderr
            line = message.line + "\n"  # whole, so that a CRLF line ending stays one
            print(neutralise(line) if out.isatty() else line, end="", file=out, flush=True)

    def _on_status(self, status: wire.Status) -> None:
        if self.container_done.is_set():
            # The first exit code or failure is the container's; the row must not change after it.
            self.logger.warning("agent reported %s after the container had ended; ignored", status.state)
            return
        self.logger.debug("agent status %s", status.state)
        match status.state:
            case wire.ContainerState.PREPARED:
                self.on_stage("prepared")
                self.on_prepared()
                self._send_plan(self._control)
            case wire.ContainerState.RUNNING:
                self.on_stage("container_running")
                self.container_running.set()
            case wire.ContainerState.EXITED:
                self.exit_code = status.exit_code
                self.logger.info("container exited with code %d", self.exit_code)
                self.container_done.set()
            case wire.ContainerState.FAILED:
                self.failure = printable(status.detail) or "the guest agent failed"
                self.container_done.set()

    def _send_plan(self, control: wire.ControlStream | None) -> None:
        plan, self.plan = self.plan, None  # once
        if plan is not None and control is not None:
            control.send(wire.PlanMessage(plan))

    def stop_container(self, grace: float, reason: str) -> None:
        """Like `podman stop`: the agent sends the container SIGTERM, then SIGKILL after `grace`; wait for its exit
        code so the row records it."""
        control = self._control
        if control is None:
            return
        self.logger.info("stopping the container (%s)", reason)
        try:
            control.send(wire.Shutdown(max(0, min(int(grace), wire.MAX_SHUTDOWN_TIMEOUT))))
        except OSError:
            return
        # `podman stop` itself, then the last log lines, under TCG: generous, but never forever.
        self.container_done.wait(grace + STOP_SLACK)


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
