"""The agent's side of the control stream, kept alive across channel resets and snapshot restores.

A restore (a clone waking up in a snapshot) breaks every stream to the host: the clone's host side is new.
The link reconnects, says hello with its restore epoch, and the host answers `restored` with its wall clock.
The agent then catches up with the world: it sets the wall clock (frozen at the snapshot instant otherwise),
flushes the neighbour cache (the gateway's MAC is the clone's), and reports its container state again, so the
host can call the clone running.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from fc_agent import network
from fc_agent.channel import Channel
from fcvm_wire import ports
from fcvm_wire.control import ControlError, ControlStream

_log = logging.getLogger("fc_agent.host_link")


def _connect(channel: Channel, timeout: float) -> ControlStream:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ControlStream(channel.connect(ports.HOST_CONTROL))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def set_wall_clock(host_time: float) -> None:
    """The clock of a restored guest stands at the snapshot instant; the host's is right."""
    time.clock_settime(time.CLOCK_REALTIME, host_time)


class HostLink:
    def __init__(self, channel: Channel, agent_version: str) -> None:
        self.channel = channel
        self.agent_version = agent_version
        self.epoch = 0
        self.plans: queue.Queue[dict[str, Any]] = queue.Queue()
        self.on_shutdown: Callable[[int], None] = lambda _timeout: None
        self.current_state: Callable[[], list[dict[str, Any]]] = list  # what to report again after a restore
        self._control: ControlStream | None = None
        self._send_lock = threading.Lock()
        self._closing = False

    def start(self, timeout: float = 60.0) -> None:
        self._attach(_connect(self.channel, timeout))
        threading.Thread(target=self._follow, daemon=True, name="host-link").start()

    def _attach(self, control: ControlStream) -> None:
        with self._send_lock:
            self._control = control
        self.send({"type": "hello", "agent": self.agent_version, "epoch": self.epoch})

    def send(self, message: dict[str, Any]) -> None:
        """Send on the current stream. While the host side is away a message is dropped: after a reconnect the
        host hears the current state again, and nothing else is worth waiting for."""
        with self._send_lock:
            control = self._control
            if control is None:
                return
            with contextlib.suppress(OSError):
                control.send(message)

    def close(self) -> None:
        self._closing = True

    def _follow(self) -> None:
        while not self._closing:
            control = self._control
            assert control is not None
            try:
                for message in control:
                    self._dispatch(message)
            except (ControlError, OSError) as exc:
                _log.warning("control stream: %s", exc)
            if self._closing:
                return
            with contextlib.suppress(OSError):
                control.close()
            _log.info("control stream ended; reconnecting")
            try:
                self._attach(_connect(self.channel, timeout=3600))
            except OSError as exc:
                _log.error("cannot reach the host again: %s", exc)
                return

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "plan":
            self.plans.put(message["plan"])
        elif kind == "shutdown":
            timeout = message.get("timeout", 10)
            self.on_shutdown(timeout if isinstance(timeout, int) and 0 <= timeout <= 3600 else 10)
        elif kind == "restored":
            self._on_restored(message)

    def _on_restored(self, message: dict[str, Any]) -> None:
        self.epoch += 1
        host_time = message.get("time")
        if isinstance(host_time, (int, float)) and not isinstance(host_time, bool):
            try:
                set_wall_clock(float(host_time))
            except OSError as exc:
                _log.warning("cannot set the clock: %s", exc)
        with contextlib.suppress(RuntimeError):
            network.flush_neighbours()
        _log.info("restored from a snapshot (epoch %d)", self.epoch)
        for state in self.current_state():
            self.send(state)
        self.send({"type": "restored", "epoch": self.epoch})
