"""`fcvm inspect NAME`: everything fcvm knows about a VM, as JSON."""

from __future__ import annotations

import json

from fcvm.core import paths
from fcvm.run.cleanup import reap_stale
from fcvm.state import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from types import SimpleNamespace


def run(args: argparse.Namespace | SimpleNamespace) -> int:
    store = Store()
    reap_stale(store)
    vm = store.require_vm(args.name)
    document = {
        **vm.to_json(),
        "dir": str(paths.vm_dir(vm.id)),
        "allocations": store.allocations(vm.id),
        "resources": [{"kind": e.kind, **e.data} for e in store.journal_entries(vm.id)],
    }
    print(json.dumps([document], indent=2))
    return 0
