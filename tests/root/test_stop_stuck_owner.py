"""`fcvm stop` has a deadline even when SIGKILL cannot take effect at once (an owner stuck in the kernel, e.g. on
hung storage; here a cgroup v1 freezer holds it, which defers a SIGKILL until thawed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core.proc import ProcessRef
from fcvm.core.wait import wait_until
from fcvm.state import Store
from tests.support import fake_owner, require, require_root

FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture
def freezer() -> Iterator[Path]:
    require_root()
    require((FREEZER / "freezer.state").exists() or (FREEZER / "cgroup.procs").exists(),
            f"needs the cgroup v1 freezer at {FREEZER}")
    group = FREEZER / f"fcvm-test-{os.getpid()}"
    group.mkdir()
    try:
        yield group
    finally:
        (group / "freezer.state").write_text("THAWED")
        wait_until(lambda: not (group / "cgroup.procs").read_text().split(), 30)
        group.rmdir()


def test_stop_returns_when_the_owner_cannot_die_yet_and_its_kill_lands_when_it_can(
    tmp_path: Path, freezer: Path
) -> None:
    marker = tmp_path / "marker"
    marker.write_text("left behind unless the journal is replayed")
    owner = fake_owner("stuck", marker, ignore_sigterm=True)
    ref = ProcessRef.of(owner.pid)
    try:
        (freezer / "cgroup.procs").write_text(str(owner.pid))
        (freezer / "freezer.state").write_text("FROZEN")
        assert wait_until(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN", 30)
        # Before the fix, stop waited for the SIGKILLed owner to die with no deadline: here, forever.
        subprocess.run([sys.executable, "-m", "fcvm", "stop", "-t", "0", "stuck"], capture_output=True, text=True,
                       timeout=120, check=False)
        assert ref.alive()  # frozen: the SIGKILL is pending
        (freezer / "freezer.state").write_text("THAWED")
        # No further signal from anyone: the SIGKILL that stop sent takes effect.
        assert owner.wait(timeout=30) == -signal.SIGKILL
    finally:
        if owner.poll() is None:
            (freezer / "freezer.state").write_text("THAWED")
            os.kill(owner.pid, signal.SIGKILL)
            owner.wait()
    listed = subprocess.run([sys.executable, "-m", "fcvm", "ls"], capture_output=True, text=True, timeout=60,
                            check=True)
    assert " stuck " not in listed.stdout
    assert Store().require_vm("stuck").status == "exited"
    assert not marker.exists()
