"""`fcvm snapshot rm TAG... [-f]`: remove snapshots; one in use by a memory server or a clone only with -f."""

from __future__ import annotations

import argparse
import shutil

from fcvm.commands.stop import each_vm, stop_vm
from fcvm.core.errors import FcvmError
from fcvm.core.kinds import RowKind
from fcvm.run.cleanup import reap_stale
from fcvm.snapshot.restore import find_snapshot
from fcvm.state import Store, VmRecord


def users(store: Store, tag: str) -> list[VmRecord]:
    """Live memory servers of the snapshot and live clones restored from it."""
    return [vm for vm in store.list_vms()
            if (vm.kind == RowKind.SERVE and vm.config.get("snapshot") == tag)
            or (vm.kind == RowKind.CLONE and vm.config.get("snapshot") == tag)]


def remove_snapshot(store: Store, tag: str, force: bool) -> None:
    record = find_snapshot(store, tag)
    in_use = users(store, record.name)
    if in_use and not force:
        names = ", ".join(f"{vm.kind} {vm.name}" for vm in in_use)
        raise FcvmError(f"snapshot {tag!r} is in use by {names}",
                        hint=f"stop them first, or `fcvm snapshot rm -f {tag}`")
    for vm in sorted(in_use, key=lambda v: v.kind == RowKind.SERVE):  # clones first: a server stops its own
        stop_vm(store, vm.id, grace=10)
    shutil.rmtree(record.path, ignore_errors=True)
    store.delete_snapshot(record.id)


def run(args: argparse.Namespace) -> int:
    store = Store()
    reap_stale(store)
    return each_vm(args.names, lambda tag: remove_snapshot(store, tag, args.force))
