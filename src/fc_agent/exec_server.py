"""Serves exec requests from the host: in the container (podman exec) or in the VM itself."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pty
import socket
import struct
import subprocess
import termios
import threading
from collections import OrderedDict

from fc_agent import system
from fc_agent.channel import Listener
from fc_agent.container import CONTAINER
from fcvm_wire import exec_proto as ep

_log = logging.getLogger("fc_agent.exec")
_seen: OrderedDict[str, None] = OrderedDict()
_seen_lock = threading.Lock()


def _first_time(request_id: str) -> bool:
    with _seen_lock:
        if request_id in _seen:
            return False
        _seen[request_id] = None
        while len(_seen) > 4096:
            _seen.popitem(last=False)
        return True


def serve(listener: Listener) -> None:
    while True:
        conn = listener.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True, name="exec").start()


def _argv(request: ep.ExecRequest) -> list[str]:
    if request.target == "vm":
        return request.argv
    flags = (["-i"] if request.interactive else []) + (["-t"] if request.tty else [])
    env = [f"--env={k}={v}" for k, v in request.env.items()]
    return ["podman", "exec", *flags, *env, CONTAINER, *request.argv]


def _handle(conn: socket.socket) -> None:
    with conn:
        try:
            request = ep.ExecRequest.from_line(ep.read_line(conn))
        except ep.ExecProtocolError as exc:
            with contextlib.suppress(OSError):
                conn.sendall(b'{"error": "%s"}\n' % str(exc).encode())
            return
        if not _first_time(request.id):
            conn.sendall(b'{"error": "duplicate"}\n')
            return
        conn.sendall(b'{"ack": "%s"}\n' % request.id.encode())
        try:
            code = _run(conn, request)
        except OSError as exc:
            _log.warning("exec %s failed: %s", request.argv, exc)
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            with contextlib.suppress(OSError):
                conn.sendall(ep.frame(ep.STDERR, f"fc-agent: {exc}\n".encode()))
        with contextlib.suppress(OSError):
            conn.sendall(ep.exit_frame(code))


def _run(conn: socket.socket, request: ep.ExecRequest) -> int:
    env = {**os.environ, **request.env} if request.target == "vm" else None
    send_lock = threading.Lock()

    def send(kind: int, data: bytes) -> None:
        with send_lock:
            conn.sendall(ep.frame(kind, data))

    if request.tty:
        master, slave = pty.openpty()
        _set_size(master, request.rows, request.cols)
        child = system.spawn(_argv(request), stdin=slave, stdout=slave, stderr=slave, env=env,
                             start_new_session=True, preexec_fn=_take_tty)
        os.close(slave)
        outputs = [(master, ep.STDOUT)]
        stdin_fd: int | None = master
    else:
        child = system.spawn(_argv(request), stdin=subprocess.PIPE if request.interactive else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert child.stdout is not None and child.stderr is not None
        outputs = [(child.stdout.fileno(), ep.STDOUT), (child.stderr.fileno(), ep.STDERR)]
        stdin_fd = child.stdin.fileno() if child.stdin else None
        master = -1

    def pump_out(fd: int, kind: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO on a pty once the child is gone
                return
            if not data:
                return
            send(kind, data)

    pumps = [threading.Thread(target=pump_out, args=o, daemon=True) for o in outputs]
    for pump in pumps:
        pump.start()
    threading.Thread(target=_pump_in, args=(conn, stdin_fd, master, child), daemon=True).start()
    code = child.wait()
    system.forget(child)
    for pump in pumps:
        pump.join(timeout=5)
    if master >= 0:
        os.close(master)
    return code if code >= 0 else 128 - code


def _pump_in(conn: socket.socket, stdin_fd: int | None, master: int, child: subprocess.Popen[bytes]) -> None:
    try:
        while (frame := ep.read_frame(conn)) is not None:
            kind, payload = frame
            if kind == ep.STDIN and stdin_fd is not None:
                os.write(stdin_fd, payload)
            elif kind == ep.STDIN_EOF and stdin_fd is not None:
                if master >= 0:
                    os.write(master, b"\x04")
                elif child.stdin:
                    child.stdin.close()
                stdin_fd = None
            elif kind == ep.RESIZE and master >= 0:
                _set_size(master, *ep.parse_resize(payload))
    except (OSError, ep.ExecProtocolError):
        pass
    # The host went away: do not leave the command running unattended.
    if child.poll() is None and stdin_fd is not None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
