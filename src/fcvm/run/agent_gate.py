"""Only the agent reaches the host: the credential on every guest -> host connection, and its delivery.

`AgentGate` stands in front of a host-side listener (`<vsock uds>_<port>`): a connection gets through only if its
first bytes are the VM's credential (fcvm_wire.credential); any other is closed unread and logged. Checks run in
their own threads with a short timeout, so a peer that sends nothing holds up neither the agent nor the others.
`deliver_credential` hands the credential to a cold-booting agent.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import queue
import socket
import threading
from pathlib import Path

from fcvm.channel.client import VsockConnectError, connect_vsock
from fcvm.core.wait import wait_until
from fcvm_wire import credential as credential_wire
from fcvm_wire import ports
from fcvm_wire.sockets import read_exact

# Connections being checked at once; more are refused outright (a flood must not cost a thread each).
MAX_CHECKING = 16
# Refusals logged one by one; after that only every LOG_EVERY-th, so a flood cannot fill the host's log.
LOGGED_REFUSALS = 20
LOG_EVERY = 1000
_POLL = 0.5  # how often the accept loop looks whether its listener was closed (close() does not wake accept())


class AgentGate:
    """A listening socket's stand-in whose `accept()` returns only connections that proved the credential (the
    bytes after it are the connection's own). `settimeout`/`accept` behave like a socket's, so a server's accept
    loop can use the gate as it is: accept raises TimeoutError after the timeout, OSError once the listener is
    closed (here or by its owner)."""

    def __init__(self, listener: socket.socket, credential: bytes, *, name: str, logger: logging.Logger,
                 timeout: float = credential_wire.CREDENTIAL_TIMEOUT) -> None:
        self.listener = listener
        self.credential = credential
        self.name = name
        self.log = logger
        self.check_timeout = timeout
        self.refused = 0
        self._accepted: queue.Queue[socket.socket | None] = queue.Queue()
        self._accept_timeout: float | None = None
        self._checking = threading.BoundedSemaphore(MAX_CHECKING)
        self._lock = threading.Lock()
        self._closed = False
        listener.settimeout(_POLL)
        threading.Thread(target=self._accept_loop, daemon=True, name=f"gate {name}").start()

    # --- what a server sees ----------------------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        self._accept_timeout = timeout

    def accept(self) -> tuple[socket.socket, str]:
        try:
            conn = self._accepted.get(timeout=self._accept_timeout)
        except queue.Empty:
            raise TimeoutError(errno.ETIMEDOUT, f"{self.name}: no connection") from None
        if conn is None:
            self._accepted.put(None)  # every later accept() fails too
            raise OSError(errno.EBADF, f"{self.name}: the listener is closed")
        return conn, ""

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.listener.close()

    # --- the checking side -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                break
            conn.settimeout(None)
            if not self._checking.acquire(blocking=False):
                self._refuse(conn, f"{MAX_CHECKING} connections are being checked already")
                continue
            threading.Thread(target=self._check, args=(conn,), daemon=True, name=f"gate {self.name}").start()
        self._accepted.put(None)

    def _check(self, conn: socket.socket) -> None:
        try:
            try:
                presented = credential_wire.receive(conn, self.check_timeout)
            except OSError as exc:
                self._refuse(conn, f"no credential within {self.check_timeout:g} s ({exc.__class__.__name__})")
                return
            if not hmac.compare_digest(presented, self.credential):
                self._refuse(conn, "a wrong credential")
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._accepted.put(conn)
        finally:
            self._checking.release()

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        with contextlib.suppress(OSError):
            conn.close()
        with self._lock:
            self.refused += 1
            count = self.refused
        if count <= LOGGED_REFUSALS or count % LOG_EVERY == 0:
            self.log.warning("%s: refused a connection without the agent's credential: %s (%d refused so far)",
                             self.name, reason, count)


def deliver_credential(vsock_uds: Path, credential: bytes, stop: threading.Event, timeout: float,
                       logger: logging.Logger) -> None:
    """Hand the credential to the cold-booting agent: connect to its GUEST_CREDENTIAL port until it listens and
    answers that it holds the credential, `stop` is set or `timeout` passes. An agent without it never connects,
    so the boot then times out as any stuck boot does."""
    delivered = False

    def attempt() -> bool:
        nonlocal delivered
        if stop.is_set():
            return True
        try:
            with connect_vsock(vsock_uds, ports.GUEST_CREDENTIAL, timeout=5.0) as sock:
                credential_wire.present(sock, credential)
                sock.settimeout(5.0)
                answer = read_exact(sock, len(credential_wire.CREDENTIAL_RECEIVED))
                delivered = answer == credential_wire.CREDENTIAL_RECEIVED
        except (VsockConnectError, OSError) as exc:  # the agent does not listen yet
            logger.debug("credential not delivered yet: %s", exc)
        return delivered

    wait_until(attempt, timeout, interval=0.05)
    if delivered:
        logger.debug("the agent holds its credential")
    elif not stop.is_set():
        logger.warning("the agent did not take its credential within %g s", timeout)
