"""`fcvm logs NAME [-f]`: the container's output (or the VM console with --console).

The container's output is `container.log.1` (once it rotated) then `container.log`, and the console's
`console.log.1` then `console.log`. Both it and the console are
the guest's text: on a terminal its control sequences are shown, never obeyed (fcvm.core.terminal); elsewhere the
bytes pass unchanged, as with podman.
"""

from __future__ import annotations

import os
import sys
import time

from fcvm.core import paths
from fcvm.core.bounded_log import existing_files
from fcvm.core.terminal import TerminalWriter
from fcvm.run.cleanup import reap_stale
from fcvm.run.container_log import log_files
from fcvm.state import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from pathlib import Path
    from types import SimpleNamespace
    from typing import BinaryIO  # typing costs every `fcvm logs` 3 ms at start

_CHUNK = 65536


def run(args: argparse.Namespace | SimpleNamespace) -> int:
    store = Store()
    reap_stale(store)
    vm = store.require_vm(args.name)
    directory = paths.vm_logs_dir(vm.id)
    files = existing_files(directory / paths.CONSOLE_LOG) if args.console else log_files(directory)
    if not files:
        return 0
    write = _writer()
    for path in files[:-1]:
        with open(path, "rb") as source:
            _copy(source, write)

    def still_running() -> bool:
        current = store.get_vm(vm.id)
        return current is not None and current.live and not current.is_stale()

    _follow(files[-1], write, still_running if args.follow else None)
    write(b"", True)
    return 0


def _writer() -> Callable[[bytes, bool], None]:
    """Writes guest bytes to stdout: neutralised on a terminal, unchanged otherwise."""
    out = sys.stdout
    if not out.isatty():
        def write_bytes(chunk: bytes, final: bool) -> None:
            out.buffer.write(chunk)
            out.flush()
        return write_bytes
    terminal = TerminalWriter()

    def write_text(chunk: bytes, final: bool) -> None:
        out.write(terminal.text(chunk, final))
        out.flush()
    return write_text


def _copy(source: BinaryIO, write: Callable[[bytes, bool], None]) -> None:
    # Line by line, so that a CRLF stays together for the terminal writer.
    while chunk := source.readline(_CHUNK):
        write(chunk, False)


def _follow(path: Path, write: Callable[[bytes, bool], None], running: Callable[[], bool] | None) -> None:
    """Copy `path`; with `running`, keep copying what is appended while it returns True. When the log rotates
    (container.log becomes container.log.1), the rest of the old file comes first, then the new one."""
    source = open(path, "rb")  # noqa: SIM115 (replaced when the file rotates)
    try:
        while True:
            _copy(source, write)
            if running is None:
                return
            if _replaced(source, path):
                _copy(source, write)  # what the old file got before it was renamed
                source.close()
                source = open(path, "rb")  # noqa: SIM115
                continue
            if not running():
                _copy(source, write)
                return
            time.sleep(0.2)
    finally:
        source.close()


def _replaced(source: BinaryIO, path: Path) -> bool:
    """Whether `path` now names another file than the one open as `source`."""
    try:
        return os.stat(path).st_ino != os.fstat(source.fileno()).st_ino
    except FileNotFoundError:  # between the rename and the new file
        return False
