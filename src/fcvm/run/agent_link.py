"""The host end of the agent's control stream (hello, plan, status, health, logs, shutdown) and health polling."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import IO, Any

from fcvm.core.kinds import Health
from fcvm_wire.control import ControlError, ControlStream
from fcvm_wire.plan import Plan


def start_thread(target: Callable[..., object], *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


class AgentLink:
    """What the agent tells the host about its container, and the one thing the host tells it: stop.

    `on_stage(name)` is called once per stage reached ("agent_connected", "container_running"); `on_health` for
    every health change the agent reports (unless the host polls a health URL itself).
    """

    def __init__(self, *, plan: Plan, send_plan: bool, restored: bool, container_log: IO[str], echo_output: bool,
                 agent_reports_health: bool, on_stage: Callable[[str], None],
                 on_health: Callable[[Health], None], logger: logging.Logger) -> None:
        self.plan = plan
        self.send_plan = send_plan
        self.restored = restored  # a clone: the agent wakes up in a snapshot and must catch up with the world
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
        """Serve every connection to the control port until the listener closes (a guest reconnects after a
        channel reset)."""
        def accept_loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                start_thread(self._session, ControlStream(conn))

        start_thread(accept_loop)

    def _session(self, control: ControlStream) -> None:
        self._control = control
        try:
            for message in control:
                kind = message["type"]
                if kind == "hello":
                    self.on_stage("agent_connected")
                    if self.restored:
                        control.send({"type": "restored", "time": time.time()})
                    elif self.send_plan:  # once: an agent that reconnects after a channel reset has its plan
                        self.send_plan = False
                        control.send({"type": "plan", "plan": json.loads(self.plan.to_json())})
                elif kind == "restored":
                    self.on_stage("restored")
                elif kind == "log":
                    self._on_log(message.get("stream", "agent"), str(message.get("line", "")))
                elif kind == "status":
                    self._on_status(message)
                elif kind == "health" and self.agent_reports_health:
                    self.on_health(Health(str(message.get("health"))))
        except (ControlError, OSError, ValueError) as exc:
            self.log.warning("agent control stream: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                control.close()

    def _on_log(self, stream: str, line: str) -> None:
        if stream == "agent":
            self.log.info("agent: %s", line)
            return
        self.container_log.write(line + "\n")
        if self.echo_output:
            print(line, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)

    def _on_status(self, message: dict[str, Any]) -> None:
        state = message.get("state")
        self.log.debug("agent status %s", state)
        if state == "running":
            self.on_stage("container_running")
            self.container_running.set()
        elif state == "exited":
            self.exit_code = int(message.get("exit_code", 1))
            self.log.info("container exited with code %d", self.exit_code)
            self.container_done.set()
        elif state == "failed":
            self.failure = str(message.get("detail", "the guest agent failed"))
            self.container_done.set()

    def stop_container(self, grace: float, reason: str) -> None:
        """Like `podman stop`: the agent sends the container SIGTERM, then SIGKILL after `grace`; wait for its exit
        code so the row records it."""
        control = self._control
        if control is None:
            return
        self.log.info("stopping the container (%s)", reason)
        try:
            control.send({"type": "shutdown", "timeout": int(grace)})
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
