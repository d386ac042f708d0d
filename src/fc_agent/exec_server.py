"""Serves exec requests from the host: in the container (through crun, see oci_exec) or in the VM itself."""

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
from collections.abc import Callable
from dataclasses import dataclass

from fc_agent import container, oci_exec, system
from fc_agent.channel import Listener
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


@dataclass
class _Started:
    child: subprocess.Popen[bytes]
    outputs: list[tuple[int, int]]  # (fd, frame kind) to forward until EOF
    stdin_fd: int | None
    master: int  # the terminal's master end, or -1
    kill: Callable[[], None]
    exit_code: Callable[[int], int] = lambda code: code  # the command's, from the child's exit status


def _run(conn: socket.socket, request: ep.ExecRequest) -> int:
    send_lock = threading.Lock()

    def send(kind: int, data: bytes) -> None:
        with send_lock:
            conn.sendall(ep.frame(kind, data))

    with contextlib.ExitStack() as stack:
        if request.target == "vm":
            started = _start_in_vm(request)
        else:
            container_id = container.started_id()
            if container_id is None:
                send(ep.STDERR, b"fc-agent: the container has not started\n")
                return oci_exec.EXIT_RUNTIME_ERROR
            try:
                execution = stack.enter_context(oci_exec.Execution(container_id, request))
            except oci_exec.ExecUnavailable as exc:
                send(ep.STDERR, f"fc-agent: {exc}\n".encode())
                return oci_exec.EXIT_RUNTIME_ERROR
            started = _start_in_container(execution, request)
        return _forward(send, conn, started)


def _start_in_vm(request: ep.ExecRequest) -> _Started:
    env = {**os.environ, **request.env}
    if request.tty:
        master, slave = pty.openpty()
        _set_size(master, request.rows, request.cols)
        child = system.spawn(request.argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                             start_new_session=True, preexec_fn=_take_tty)
        os.close(slave)
        return _Started(child, [(master, ep.STDOUT)], master, master, child.kill)
    child = system.spawn(request.argv, stdin=subprocess.PIPE if request.interactive else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    return _Started(child, _pipes(child), child.stdin.fileno() if child.stdin else None, -1, child.kill)


def _start_in_container(execution: oci_exec.Execution, request: ep.ExecRequest) -> _Started:
    """crun's own messages come on its stderr; a terminal's output on the master end crun passes us."""
    interactive = request.interactive and not request.tty
    child = system.spawn(execution.argv, stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs = _pipes(child)
    stdin_fd = child.stdin.fileno() if child.stdin else None
    master = -1
    if request.tty and (console := execution.receive_console(child)) is not None:
        master = console
        outputs.append((master, ep.STDOUT))
        stdin_fd = master
    return _Started(child, outputs, stdin_fd, master, lambda: execution.kill(child), execution.exit_code)


def _pipes(child: subprocess.Popen[bytes]) -> list[tuple[int, int]]:
    assert child.stdout is not None and child.stderr is not None
    return [(child.stdout.fileno(), ep.STDOUT), (child.stderr.fileno(), ep.STDERR)]


def _forward(send: Callable[[int, bytes], None], conn: socket.socket, started: _Started) -> int:
    def pump_out(fd: int, kind: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO on a pty once the child is gone
                return
            if not data:
                return
            send(kind, data)

    pumps = [threading.Thread(target=pump_out, args=o, daemon=True) for o in started.outputs]
    for pump in pumps:
        pump.start()
    threading.Thread(target=_pump_in, args=(conn, started), daemon=True).start()
    code = started.child.wait()
    system.forget(started.child)
    for pump in pumps:
        pump.join(timeout=5)
    if started.master >= 0:
        os.close(started.master)
    return 128 - code if code < 0 else started.exit_code(code)


def _pump_in(conn: socket.socket, started: _Started) -> None:
    stdin_fd = started.stdin_fd
    try:
        while (frame := ep.read_frame(conn)) is not None:
            kind, payload = frame
            if kind == ep.STDIN and stdin_fd is not None:
                os.write(stdin_fd, payload)
            elif kind == ep.STDIN_EOF and stdin_fd is not None:
                if started.master >= 0:
                    os.write(started.master, b"\x04")
                elif started.child.stdin:
                    started.child.stdin.close()
                stdin_fd = None
            elif kind == ep.RESIZE and started.master >= 0:
                _set_size(started.master, *ep.parse_resize(payload))
    except (OSError, ep.ExecProtocolError):
        pass
    # The host went away: do not leave the command running unattended.
    if started.child.poll() is None and stdin_fd is not None:
        started.kill()


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
