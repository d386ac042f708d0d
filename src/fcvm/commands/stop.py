"""`fcvm stop NAME...`: ask each VM's fcvm process to shut down, then make sure it did."""

from __future__ import annotations

import argparse
import signal
import sys
import time

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


def run(args: argparse.Namespace) -> int:
    store = Store()
    failed = False
    for name in args.names:
        try:
            stop_vm(store, name, args.time)
            print(name)
        except FcvmError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0
