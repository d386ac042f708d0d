"""The VM's console file is the guest's to fill: whatever the guest prints, the host keeps a bounded amount."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fcvm.core.bounded_log import MAX_BYTES, existing_files
from fcvm.core.log import MAX_LINE
from fcvm.vmm.process import VmmProcess

# 5 MiB in short lines, then 25 MiB in one line: more than the bound, and more than a line may take in memory.
_FLOOD = (f"import sys; out = sys.stdout.buffer; [out.write(b'line %d\\n' % i) for i in range({5 << 20} // 12)];"
          f" out.write(b'x' * ({25 << 20})); out.write(b'\\nlast line\\n')")


def test_a_flooding_vmm_leaves_a_bounded_console_that_ends_with_its_last_line(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    vmm = VmmProcess([sys.executable, "-c", _FLOOD], console=console, logger=logging.getLogger("fcvm.test.flood"))
    vmm.start()
    try:
        assert vmm.wait(120) == 0
    finally:
        vmm.stop()
    files = existing_files(console)
    assert [f.name for f in files] == ["console.log.1", "console.log"]
    assert sum(f.stat().st_size for f in files) <= 2 * MAX_BYTES
    assert console.read_bytes().endswith(b"x\nlast line\n")
    assert vmm.output().endswith("last line")
    # The one long line reached the file in bounded pieces, never whole.
    assert max(len(line) for f in files for line in f.read_bytes().splitlines()) <= MAX_LINE
