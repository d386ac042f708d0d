"""`fcvm logs NAME [-f]`: the container's output (or the VM console with --console)."""

from __future__ import annotations

import argparse
import sys
import time

from fcvm.core import paths
from fcvm.run.cleanup import reap_stale
from fcvm.state import Store


def run(args: argparse.Namespace) -> int:
    store = Store()
    reap_stale(store)
    vm = store.require_vm(args.name)
    path = paths.vm_logs_dir(vm.id) / ("console.log" if args.console else "container.log")
    if not path.exists():
        return 0
    with open(path, "rb") as source:
        while True:
            chunk = source.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                continue
            sys.stdout.flush()
            if not args.follow:
                return 0
            current = store.get_vm(vm.id)
            if current is None or not current.live or current.is_stale():
                return 0
            time.sleep(0.2)
