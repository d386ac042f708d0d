"""`fcvm gc`: finish the cleanup that SIGKILLed fcvm processes could not do themselves."""

from __future__ import annotations

import argparse
import shutil

from fcvm.core import log, paths
from fcvm.run.cleanup import reap_stale, replay
from fcvm.state import Store
from fcvm.state.journal import owner_alive

_log = log.get("gc")


def collect(store: Store) -> dict[str, int]:
    reaped = reap_stale(store)
    live = {vm.id for vm in store.list_vms()}
    known = {vm.id for vm in store.list_vms(include_exited=True)}
    orphans = 0
    # Journals and allocations whose owner is not live: a process that died before (or after) its row.
    for owner in store.journal_owners() - live:
        if owner_alive(owner):
            continue
        failures = replay(store, owner)
        orphans += 1
        for failure in failures:
            _log.warning("still left after gc: %s", failure)
    for owner in store.allocation_owners() - live:
        store.release_allocations(owner)
    dirs = 0
    for parent in (paths.vms_dir(), paths.data_dir() / "logs"):
        if not parent.is_dir():
            continue
        for directory in parent.iterdir():
            if directory.is_dir() and directory.name not in known:
                shutil.rmtree(directory, ignore_errors=True)
                dirs += 1
    return {"reaped": len(reaped), "journals": orphans, "dirs": dirs}


def run(args: argparse.Namespace) -> int:
    summary = collect(Store())
    print(f"reaped {summary['reaped']} dead VMs, replayed {summary['journals']} orphaned journals, "
          f"removed {summary['dirs']} stray VM directories")
    return 0
