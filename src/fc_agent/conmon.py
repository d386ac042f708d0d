"""What conmon leaves for a running container: the container's output in a k8s-file log, and its exit code in the
exit dir, written before conmon exits.

Reading those replaces `podman logs --follow` and `podman wait`: each was a Go process polling podman's state
for the container's whole life, ~8 % of a TCG vCPU apiece in an idle guest, competing with the container as it
starts and with the agent right after a restore. (Paths: podman's defaults for root, which the guest keeps.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fcvm_wire.control import MAX_LOG_LINE, LogStream

_RUN_ROOT = Path("/run/containers/storage/overlay-containers")
_GRAPH_ROOT = Path("/var/lib/containers/storage/overlay-containers")
_EXIT_DIR = Path("/run/libpod/exits")
_FOLLOW_POLL = 0.1
_log = logging.getLogger("fc_agent.conmon")


def wait_for_exit(container_id: str) -> int | None:
    """Block until the container's conmon has exited; the container's exit code, or None if conmon left none."""
    with contextlib.suppress(OSError, ValueError):
        pidfd = os.pidfd_open(int((_RUN_ROOT / container_id / "userdata" / "conmon.pid").read_text()))
        try:
            select.select([pidfd], [], [])  # readable once the process has exited
        finally:
            os.close(pidfd)
    try:
        text = (_EXIT_DIR / container_id).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdecimal() and int(text) <= 255 else None


def follow_log(container_id: str, emit: Callable[[LogStream, str], None], ended: threading.Event) -> None:
    """Call emit(stream, line) for every line of the container's log, from its start, until `ended` (set once
    conmon has exited, so nothing more comes) and the log is read to its end. A line longer than one log message
    holds arrives in pieces, so a container that never prints a newline cannot fill the agent's memory."""
    partial = {LogStream.STDOUT: bytearray(), LogStream.STDERR: bytearray()}

    def record(line: bytes) -> None:
        # "<time> <stdout|stderr> <F|P>[tags] <text>": P marks a line conmon had to cut.
        fields = line.split(b" ", 3)
        if len(fields) != 4:
            return
        stream = LogStream.STDERR if fields[1] == b"stderr" else LogStream.STDOUT
        text = partial[stream]
        text += fields[3]
        if fields[2].startswith(b"F") or len(text) >= MAX_LOG_LINE:
            emit(stream, text.decode(errors="replace"))
            text.clear()

    path = _GRAPH_ROOT / container_id / "userdata" / "ctr.log"
    try:
        log = open(path, "rb")  # noqa: SIM115 (held across the loop below)
    except OSError as exc:
        _log.warning("cannot follow the container's log: %s", exc)
        return
    with log:
        pending = b""
        while True:
            finished = ended.is_set()  # before the read: whatever conmon wrote is then in it
            chunk = log.read(1 << 16)
            if chunk:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    record(line)
            elif finished:
                break
            else:
                time.sleep(_FOLLOW_POLL)
    for stream, text in partial.items():
        if text:
            emit(stream, text.decode(errors="replace"))
