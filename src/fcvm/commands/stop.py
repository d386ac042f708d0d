"""`fcvm stop NAME...`: ask each VM's fcvm process to shut down, then make sure it did."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fcvm.core.errors import FcvmError
from fcvm.run.agent_link import STOP_SLACK
from fcvm.run.cleanup import reap_stale
from fcvm.state import Store


def stop_vm(store: Store, name: str, grace: float) -> None:
    vm = store.require_vm(name)
    if not vm.live:
        return
    process = vm.process
    if process is not None:
        # The owner cleans up on SIGTERM (stops the container within `grace`, then the guest, and replays its
        # journal); after that and time to tear down it is killed, and we clean up for it. The owner reads the
        # grace from the row when the signal comes.
        store.update_config(vm.id, stop_grace=grace)
        process.terminate(timeout=grace + STOP_SLACK + 15)
    reap_stale(store)


def each_vm(names: list[str], action: Callable[[str], None]) -> int:
    """Apply `action` to every named VM like podman does: print each name done, report each failure, go on."""
    failed = False
    for name in names:
        try:
            action(name)
            print(name)
        except FcvmError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    store = Store()
    return each_vm(args.names, lambda name: stop_vm(store, name, args.time))
