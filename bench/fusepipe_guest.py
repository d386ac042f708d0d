"""fuse-pipe inside a booted guest: the read and write cases of bench/fusepipe.py on a `--map` volume, against the
guest's own disk (its root filesystem, ext4 on virtio-blk), in the same VM and the same run. That is what a user
of `--map` feels.

    sudo PYTHONPATH=src python3 bench/fusepipe_guest.py [--files 1024] [--readers 256] [--writes 256]
                                                       [--writers 32] [--reps 3]

One VM (`fcvm podman run -d --no-snapshot --map DIR:/vol localhost/fcvm-demo-httpd`, 2 vCPUs, 1 GiB) in a data
dir of its own (the built assets are shared). The load is bench/fusepipe.py's C driver, linked statically here
and copied into the guest's disk, run with `fcvm exec --vm` (in the VM, where the agent's relay mounts the
volume at /run/fcvm/volumes/0). Before each read run the guest drops its caches (`drop_caches`: cold in the
guest, the host's page cache warm, on both sides); each write run creates its files in a new directory. The
read files on the volume are made on the host, those on the guest disk by the driver in the guest.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "fp-bench"
IMAGE = "localhost/fcvm-demo-httpd"
VOLUME = "/run/fcvm/volumes/0"  # where the agent mounts the first --map volume in the VM
DISK = "/root/fp-bench"  # on the guest's root filesystem


def fcvm(*args: str, timeout: float = 600) -> str:
    result = subprocess.run([sys.executable, "-m", "fcvm", *args], capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"fcvm {' '.join(args[:3])} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def in_guest(script: str) -> str:
    return fcvm("exec", "--vm", NAME, "--", "sh", "-c", script)


def driver(*args: object) -> float:
    """One driver run in the guest, after dropping the guest's caches; its own timing, in ms."""
    return float(in_guest(f"sync && echo 3 > /proc/sys/vm/drop_caches && {DISK}/driver "
                          + " ".join(map(str, args))).strip())


def host_bench() -> Any:
    """bench/fusepipe.py: its C driver and its load arguments."""
    spec = importlib.util.spec_from_file_location("fusepipe_bench", Path(__file__).with_name("fusepipe.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_static_driver(work: Path) -> Path:
    src, exe = work / "driver.c", work / "driver"
    src.write_text(host_bench().DRIVER_C)
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def main() -> int:
    ap = argparse.ArgumentParser()
    host_bench().load_arguments(ap, reps=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (boots a VM)", file=sys.stderr)
        return 1
    os.environ.setdefault("FCVM_ASSETS_DIR", "/var/lib/fcvm/assets")  # share the built assets
    data_dir = Path(tempfile.mkdtemp(prefix="bench-fp-guest-", dir="/var/lib/fcvm"))
    os.environ["FCVM_DATA_DIR"] = str(data_dir)
    work = Path(tempfile.mkdtemp(prefix="fp-guest-", dir="/var/tmp"))
    try:
        vol = work / "vol"
        (vol / "reads").mkdir(parents=True)
        for i in range(args.files):
            (vol / "reads" / f"f{i:05d}").write_bytes(os.urandom(4096))
        shutil.copy(build_static_driver(work), vol / "driver")
        start = time.monotonic()
        fcvm("podman", "run", "-d", "--no-snapshot", "--name", NAME, "--map", f"{vol}:/vol", IMAGE)
        boot = time.monotonic() - start
        in_guest(f"mkdir -p {DISK}/reads && cp {VOLUME}/driver {DISK}/driver && "
                 f"{DISK}/driver write {DISK}/reads {args.files} 32 >/dev/null")
        results: dict[str, list[float]] = {k: [] for k in ("read_disk", "read_fp", "write_disk", "write_fp")}
        for rep in range(args.reps):
            sides = [("disk", DISK), ("fp", VOLUME)]
            for side, root in sides if rep % 2 == 0 else sides[::-1]:  # alternate which side goes first
                results[f"read_{side}"].append(driver("read", f"{root}/reads", args.files, args.readers))
                in_guest(f"mkdir {root}/w{rep}")
                results[f"write_{side}"].append(driver("write", f"{root}/w{rep}", args.writes, args.writers))
    finally:
        subprocess.run([sys.executable, "-m", "fcvm", "rm", "-f", NAME], capture_output=True, check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"fuse-pipe in a guest (boot {boot:.0f} s): {args.files}x4KB reads by {args.readers} readers; "
          f"{args.writes}x create+4KB write+fsync by {args.writers} threads; median of {args.reps}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  parallel reads   guest disk {med['read_disk']:8.1f} ms   fuse-pipe {med['read_fp']:8.1f} ms   "
          f"ratio {med['read_fp'] / med['read_disk']:5.1f}x")
    print(f"  write+fsync      guest disk {med['write_disk']:8.1f} ms   fuse-pipe {med['write_fp']:8.1f} ms   "
          f"ratio {med['write_fp'] / med['write_disk']:5.1f}x")
    print("  raw: " + ", ".join(f"{k}={[round(x, 1) for x in v]}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
