from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fcvm.core import paths
from fcvm.state import Store
from fcvm.state.journal import Journal


def test_gc_replays_orphaned_journals_and_removes_stray_directories(tmp_path: Path) -> None:
    store = Store()
    # A process that died after journaling but before (or after deleting) its row.
    leftover = tmp_path / "leftover.sock"
    leftover.write_text("")
    Journal(store, "deadbeef0001").record("socket", path=str(leftover))
    store.allocate("subnet", "deadbeef0001", ["7"])
    stray_vm = paths.ensure_dir(paths.vm_dir("deadbeef0002"))
    stray_logs = paths.ensure_dir(paths.vm_logs_dir("deadbeef0003"))
    kept = store.create_vm("kept")  # an exited VM keeps its logs until `fcvm rm`
    store.update_vm(kept.id, status="exited", exit_code=0)
    kept_logs = paths.ensure_dir(paths.vm_logs_dir(kept.id))

    result = subprocess.run([sys.executable, "-m", "fcvm", "gc"], capture_output=True, text=True, check=True)

    assert "replayed 1 orphaned journals" in result.stdout
    assert not leftover.exists()
    assert store.journal_owners() == set() and store.allocation_owners() == set()
    assert not stray_vm.exists() and not stray_logs.exists()
    assert kept_logs.exists()
