"""`fcvm stop` ends a VM whose owner will not: SIGTERM, then SIGKILL after the grace period, then it reaps the row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fcvm.state import Store
from tests.support import fake_owner


def test_an_owner_that_ignores_sigterm_is_killed_and_its_row_reaped(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("left behind unless the journal is replayed")
    owner = fake_owner("stubborn", marker, ignore_sigterm=True)
    try:
        stopped = subprocess.run([sys.executable, "-m", "fcvm", "stop", "-t", "0", "stubborn"], capture_output=True,
                                 text=True, timeout=120, check=False)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.split() == ["stubborn"]
        assert owner.wait(timeout=30) == -signal.SIGKILL
    finally:
        if owner.poll() is None:
            os.kill(owner.pid, signal.SIGKILL)
            owner.wait()
    vm = Store().require_vm("stubborn")
    assert vm.status == "exited" and vm.exit_code is None
    assert not marker.exists()
    assert Store().allocations(vm.id) == {}
