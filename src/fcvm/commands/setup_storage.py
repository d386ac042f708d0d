"""`fcvm setup storage`: make the data directory btrfs so per-VM disks are reflinks."""

from __future__ import annotations

import argparse

from fcvm.storage.btrfs import setup_storage


def run(args: argparse.Namespace) -> int:
    print(setup_storage(args.size))
    return 0
