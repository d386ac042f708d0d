"""`fcvm snapshot prune [--all]`: remove snapshot cache entries, least recently used first, until the cache
fits its size limit (FCVM_SNAPSHOT_CACHE_MAX); `--all` removes every entry not in use."""

from __future__ import annotations

import argparse

from fcvm.run.cleanup import reap_stale
from fcvm.snapshot.cache import prune
from fcvm.state import Store


def run(args: argparse.Namespace) -> int:
    store = Store()
    reap_stale(store)
    removed = prune(store, everything=args.all)
    freed = sum(int(r.info.get("size", 0)) for r in removed)
    print(f"removed {len(removed)} cache entries, {freed / (1 << 20):.0f} MiB")
    return 0
