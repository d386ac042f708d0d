"""The agent's side of the control stream, kept alive across channel resets and snapshot restores.

A restore (a clone, or a warm run, waking up in a snapshot) breaks every stream to the host: the host side is
new. The link reconnects and says hello; the host answers `restore` with its wall clock. The agent then catches
up with the world: it sets the wall clock (frozen at the snapshot instant otherwise), reports its container's
state again and says `restored`, so the host can call the VM running (or send the run's plan, when the snapshot
was taken before the run). Its neighbour cache stays right: every VM's gateway has the same address and MAC.

Every connection the agent opens to the host starts with its credential (fcvm_wire.credential), which the host
hands over once, at a cold boot, before anything else happens in the guest.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from fc_agent.channel import Channel
from fcvm_wire import credential as credential_wire
from fcvm_wire import ports
from fcvm_wire.control import (
    ControlError,
    ControlStream,
    Hello,
    Message,
    PlanMessage,
    PrepareMessage,
    Restore,
    Restored,
    Shutdown,
)
from fcvm_wire.plan import Plan
from fcvm_wire.sockets import closed_on_error

_log = logging.getLogger("fc_agent.host_link")


def receive_credential(channel: Channel, timeout: float) -> bytes:
    """The credential, from the first host connection to GUEST_CREDENTIAL that brings one whole; the port is
    closed again before this returns, so nothing else in the guest is ever handed it."""
    deadline = time.monotonic() + timeout
    listener = channel.listen(ports.GUEST_CREDENTIAL)
    try:
        while True:
            conn = listener.accept(timeout=max(0.0, deadline - time.monotonic()))
            with conn:
                try:
                    credential = credential_wire.receive(conn)
                    conn.sendall(credential_wire.CREDENTIAL_RECEIVED)
                except OSError as exc:
                    _log.warning("credential delivery broke off (%s); waiting for another", exc)
                    continue
            return credential
    finally:
        listener.close()


class HostLink:
    def __init__(self, channel: Channel, agent_version: str, credential: bytes) -> None:
        self.channel = channel
        self.agent_version = agent_version
        self.credential = credential
        self.epoch = 0  # restores so far
        self.prepares: queue.Queue[Plan] = queue.Queue()
        self.plans: queue.Queue[Plan] = queue.Queue()
        self.on_shutdown: Callable[[int], None] = lambda _timeout: None
        self.current_state: Callable[[], list[Message]] = list  # what to report again after a restore
        self._control: ControlStream | None = None
        self._send_lock = threading.Lock()
        self._closing = False

    def connect(self, port: int) -> socket.socket:
        """A stream to the host's listener for `port`, the credential already sent on it."""
        with closed_on_error(self.channel.connect(port)) as sock:
            return credential_wire.present(sock, self.credential)

    def _connect_control(self, timeout: float) -> ControlStream:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return ControlStream(self.connect(ports.HOST_CONTROL))
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def start(self, timeout: float = 60.0) -> None:
        self._attach(self._connect_control(timeout))
        threading.Thread(target=self._follow, daemon=True, name="host-link").start()

    def _attach(self, control: ControlStream) -> None:
        with self._send_lock:
            self._control = control
        self.send(Hello(self.agent_version, self.epoch))

    def send(self, message: Message) -> None:
        """Send on the current stream. While the host side is away a message is dropped: after a reconnect the
        host hears the current state again, and nothing else is worth waiting for."""
        with self._send_lock:
            control = self._control
            if control is not None:
                with contextlib.suppress(OSError):
                    control.send(message)

    def close(self) -> None:
        self._closing = True

    def _follow(self) -> None:
        while not self._closing:
            control = self._control
            assert control is not None
            with contextlib.suppress(OSError):
                while (message := self._receive(control)) is not None:
                    self._dispatch(message)
            if self._closing:
                return
            with contextlib.suppress(OSError):
                control.close()
            _log.info("control stream ended; reconnecting")
            try:
                self._attach(self._connect_control(timeout=3600))
            except OSError as exc:
                _log.error("cannot reach the host again: %s", exc)
                return

    @staticmethod
    def _receive(control: ControlStream) -> Message | None:
        while True:
            try:
                return control.receive()
            except ControlError as exc:  # the host is trusted: a bad message is a bug worth a log line
                _log.warning("control stream: %s", exc)

    def _dispatch(self, message: Message) -> None:
        match message:
            case PrepareMessage():
                self.prepares.put(message.plan)
            case PlanMessage():
                self.plans.put(message.plan)
            case Shutdown():
                self.on_shutdown(message.timeout)
            case Restore():
                self._on_restore(message)
            case _:
                _log.warning("host sent a %s message, which only the agent sends", message.TYPE)

    def _on_restore(self, message: Restore) -> None:
        self.epoch += 1
        try:
            time.clock_settime(time.CLOCK_REALTIME, message.time)
        except OSError as exc:
            _log.warning("cannot set the clock: %s", exc)
        _log.info("restored from a snapshot (restore %d)", self.epoch)
        for state in self.current_state():
            self.send(state)
        self.send(Restored(self.epoch))
