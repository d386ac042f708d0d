"""The channel's self-test, run in the guest instead of the agent (`python3 -m fc_agent.selftest`, through the
initramfs' fcvm_init hook): echo on port 1024, report `up <transport> <pid>` to host port 1000, and exit when
the host closes that report stream. It lives in the guest package because the guest holds nothing else."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time

from fc_agent.channel import Listener, open_channel

_log = logging.getLogger("fc_agent.selftest")

SELFTEST_REPORT_PORT = 1000
SELFTEST_ECHO_PORT = 1024


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(1 << 16):
            conn.sendall(data)


def _serve_echo(listener: Listener) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:
            return
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def selftest(timeout: float = 120.0) -> int:
    """Instead of the agent (fcvm_init hook): echo on port 1024, report `up <transport> <pid>` to host
    port 1000, and exit when the host closes that report stream."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    deadline = time.monotonic() + timeout
    with open_channel(timeout) as channel:
        threading.Thread(target=_serve_echo, args=(channel.listen(SELFTEST_ECHO_PORT),), daemon=True).start()
        while True:
            try:
                report = channel.connect(SELFTEST_REPORT_PORT, timeout=max(1.0, deadline - time.monotonic()))
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    _log.error("selftest: cannot reach host port %d: %s", SELFTEST_REPORT_PORT, exc)
                    return 1
                time.sleep(0.2)
        with report:
            report.sendall(f"up {channel.transport} {os.getpid()}\n".encode())
            while report.recv(4096):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(selftest())
