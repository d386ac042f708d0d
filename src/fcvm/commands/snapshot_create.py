"""`fcvm snapshot create NAME|--pid PID [--tag TAG]`: snapshot a running VM; prints the tag."""

from __future__ import annotations

import argparse

from fcvm.core.errors import NotFoundError, UsageError
from fcvm.run.cleanup import reap_stale
from fcvm.run.request import validate_name
from fcvm.snapshot.create import create_snapshot
from fcvm.state import Store, VmRecord


def find_by_pid(store: Store, pid: int) -> VmRecord:
    """The live VM whose fcvm process (what a shell's `$!` gives) has this pid."""
    found = next((vm for vm in store.list_vms() if vm.pid == pid), None)
    if found is None:
        raise NotFoundError(f"no running VM belongs to fcvm process {pid}", hint="see `fcvm ls`")
    return found


def run(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.pid is None):
        raise UsageError("give the VM's NAME or --pid PID (one of them)")
    store = Store()
    reap_stale(store)
    vm = find_by_pid(store, args.pid) if args.pid is not None else store.require_vm(args.name)
    tag = validate_name(args.tag or vm.name)
    record = create_snapshot(store, vm, tag)
    print(record.name)
    return 0
