"""`fcvm rm NAME...`: forget exited VMs and delete their files (stop running ones first with -f)."""

from __future__ import annotations

import argparse
import shutil

from fcvm.commands.stop import each_vm, stop_vm
from fcvm.core import paths
from fcvm.core.errors import FcvmError
from fcvm.run.cleanup import reap_stale
from fcvm.state import Store


def remove_vm(store: Store, name: str, force: bool) -> None:
    vm = store.require_vm(name)
    if vm.live:
        if not force:
            raise FcvmError(f"VM {name!r} is {vm.status}", hint=f"stop it first, or use `fcvm rm -f {name}`")
        stop_vm(store, name, grace=10)
    shutil.rmtree(paths.vm_dir(vm.id), ignore_errors=True)
    shutil.rmtree(paths.vm_logs_dir(vm.id), ignore_errors=True)
    store.delete_vm(vm.id)


def run(args: argparse.Namespace) -> int:
    store = Store()
    reap_stale(store)
    return each_vm(args.names, lambda name: remove_vm(store, name, args.force))
