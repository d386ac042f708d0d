"""`fcvm exec NAME [--vm] [-i] [-t] -- CMD`: run a command in a VM's container, or in the VM."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import socket
import sys
import termios
import threading
import tty
import uuid
from pathlib import Path

from fcvm.core.errors import FcvmError, UsageError
from fcvm.state import Store, VmRecord
from fcvm_wire import exec_proto as ep
from fcvm_wire import ports
from fcvm_wire.checks import printable
from fcvm_wire.sockets import closed_on_error

_ATTEMPTS = 3


def _open(uds: Path, request: ep.ExecRequest) -> socket.socket:
    """Connect and get the agent's ack; retry only while no ack came (the id makes retries safe)."""
    from fcvm.channel import connect_vsock

    last_error: Exception | None = None
    for _ in range(_ATTEMPTS):
        try:
            with closed_on_error(connect_vsock(uds, ports.GUEST_EXEC, timeout=10)) as sock:
                sock.sendall(request.to_line())
                reply = ep.read_line(sock)
        except (OSError, ep.ExecProtocolError, FcvmError) as exc:
            last_error = exc
            continue
        if b'"ack"' in reply:
            return sock
        sock.close()
        raise FcvmError(f"the guest agent refused the exec: {printable(reply.decode(errors='replace').strip())}")
    raise FcvmError(f"cannot reach the guest agent: {last_error}")


def run(args: argparse.Namespace) -> int:
    command = args.command
    if not command:
        raise UsageError("fcvm exec needs a command: fcvm exec NAME -- CMD [ARGS...]")
    vm = Store().require_vm(args.name)
    return exec_in(vm, command, in_vm=args.vm, use_tty=args.tty and sys.stdin.isatty(), interactive=args.interactive)


def exec_in(vm: VmRecord, command: list[str], *, in_vm: bool = False, use_tty: bool = False,
            interactive: bool = False) -> int:
    """Run `command` in `vm`'s container (or the VM), relaying its output; returns its exit code."""
    if not vm.live or vm.is_stale():
        raise FcvmError(f"VM {vm.name!r} is not running")
    size = shutil.get_terminal_size()
    request = ep.ExecRequest(id=uuid.uuid4().hex, argv=command, target="vm" if in_vm else "container",
                             tty=use_tty, interactive=interactive, rows=size.lines, cols=size.columns)
    vsock_uds = vm.config.get("vsock_uds")
    if not vsock_uds:
        raise FcvmError(f"VM {vm.name!r} has no agent socket yet")
    sock = _open(Path(vsock_uds), request)
    saved = termios.tcgetattr(sys.stdin) if use_tty else None
    try:
        if saved is not None:
            tty.setraw(sys.stdin)
            signal.signal(signal.SIGWINCH, lambda *_: _send_size(sock))
        if interactive:
            threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
        return _pump_output(sock)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        sock.close()


def _send_size(sock: socket.socket) -> None:
    size = shutil.get_terminal_size()
    with contextlib.suppress(OSError):
        sock.sendall(ep.resize_frame(size.lines, size.columns))


def _pump_stdin(sock: socket.socket) -> None:
    fd = sys.stdin.fileno()
    try:
        while True:
            select.select([fd], [], [])
            data = os.read(fd, 65536)
            if not data:
                sock.sendall(ep.frame(ep.STDIN_EOF))
                return
            sock.sendall(ep.frame(ep.STDIN, data))
    except OSError:
        return


def _pump_output(sock: socket.socket) -> int:
    outputs = {ep.STDOUT: sys.stdout.buffer, ep.STDERR: sys.stderr.buffer}
    try:
        while (frame := ep.read_frame(sock)) is not None:
            kind, payload = frame
            if kind in outputs:
                outputs[kind].write(payload)
                outputs[kind].flush()
            elif kind == ep.EXIT:
                return ep.parse_exit(payload)
    except ep.ExecProtocolError as exc:  # the guest is untrusted: its frames are checked, never trusted
        raise FcvmError(f"the guest agent broke the exec protocol: {exc}") from None
    raise FcvmError("the connection to the guest closed before the command finished")
