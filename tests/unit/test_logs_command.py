"""`fcvm logs`: the rotated container.log first, then the current one; on a terminal the guest's control
sequences are shown, not obeyed; into a pipe the bytes pass unchanged."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from fcvm.core import paths
from fcvm.state import Store

OLDER = b"older line\n"
NEWER = b"\x1b]52;c;cGF3bmVk\x07clipboard \x1b[2J\x1b[31mred\x1b[0m\r\ncrlf kept\n"


def fcvm_logs(name: str, stdout: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "fcvm", "logs", name], stdout=stdout, stderr=subprocess.PIPE,
                          timeout=60, check=True)


def test_logs_reads_the_rotated_file_first_and_neutralises_only_on_a_terminal() -> None:
    store = Store()
    vm = store.create_vm("web")
    logs = paths.ensure_dir(paths.vm_logs_dir(vm.id), 0o700)
    (logs / "container.log.1").write_bytes(OLDER)
    (logs / "container.log").write_bytes(NEWER)

    assert fcvm_logs("web", subprocess.PIPE).stdout == OLDER + NEWER

    main, secondary = pty.openpty()
    try:
        fcvm_logs("web", secondary)
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the writer is gone and everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
    text = shown.decode().replace("\r\n", "\n")  # undo the terminal's own newline translation (onlcr)
    assert "\x1b" not in text and "\x07" not in text
    assert text == ("older line\n\\x1b]52;c;cGF3bmVk\\x07clipboard \\x1b[2J\\x1b[31mred\\x1b[0m\r\ncrlf kept\n")
