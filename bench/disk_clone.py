"""Per-VM disk creation: reflink copy of a rootfs-sized image vs a full copy, in the fcvm data dir.

Run (as root, after `fcvm setup storage`): python3 bench/disk_clone.py [--size-mib 2048] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fcvm.core import paths
from fcvm.storage.btrfs import clone_file, filesystem_type


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    base_dir = paths.ensure_dir(paths.data_dir())
    with tempfile.TemporaryDirectory(dir=base_dir, prefix="bench-") as scratch:
        image = Path(scratch) / "base.ext4"
        with open(image, "wb") as out:  # real data, not a sparse hole, like a built rootfs
            block = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                out.write(block)
        reflink_times = []
        for i in range(args.runs):
            start = time.perf_counter()
            reflinked = clone_file(image, Path(scratch) / f"vm{i}.ext4")
            reflink_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        shutil.copyfile(image, Path(scratch) / "full.ext4")
        full = time.perf_counter() - start
    reflink_ms = statistics.median(reflink_times) * 1000
    print(f"filesystem {filesystem_type(base_dir)}; image {args.size_mib} MiB; reflink={reflinked}")
    print(f"reflink clone (median of {args.runs}) {reflink_ms:8.2f} ms")
    print(f"full copy                         {full * 1000:8.1f} ms")
    print(f"ratio full/reflink                {full * 1000 / reflink_ms:8.0f}x")


if __name__ == "__main__":
    main()
