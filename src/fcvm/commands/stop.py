"""`fcvm stop NAME...`: ask each VM's fcvm process to shut down, then make sure it did."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable

from fcvm.cleanup import reap_stale
from fcvm.core.errors import FcvmError
from fcvm.state import Store


def stop_vm(store: Store, name: str, grace: float) -> None:
    vm = store.require_vm(name)
    if not vm.live:
        return
    process = vm.process
    if process is not None and process.signal(signal.SIGTERM):
        # The owner cleans up on SIGTERM (stops the guest, replays its journal); give it the grace
        # period plus time to tear down, then kill it and clean up for it.
        deadline = time.monotonic() + grace + 15
        while process.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.alive():
            process.signal(signal.SIGKILL)
            while process.alive():
                time.sleep(0.02)
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
