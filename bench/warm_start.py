"""Warm starts from the snapshot cache against a cold boot, measured in one run and printed as ratios.

Each case times `fcvm podman run -d ... localhost/fcvm-demo-httpd` from the command's start until (a) the command
returns and (b) the published page is served:
- cold: the cache bypassed (--no-snapshot); it also shows what the first run of an image costs;
- a first cache-filling run (leaves the pre-start and startup entries behind);
- warm from the startup entry: the same name and config, another host port;
- warm from the pre-start entry: another name and env.

Run (root, after scripts/setup-host.sh): python3 bench/warm_start.py [--runs 3]
It uses a data dir of its own under /var/lib/fcvm (the same btrfs, so disks and memory are reflinks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

IMAGE = "localhost/fcvm-demo-httpd"


def fcvm(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fcvm", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"fcvm {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def served(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"port {port} never served the page")


def one_run(name: str, *extra: str) -> tuple[float, float, str]:
    """(seconds until `run -d` returned, seconds until the page was served, where it started from)."""
    port = free_port()
    start = time.monotonic()
    fcvm("podman", "run", "-d", "--name", name, "-p", f"{port}:80", *extra, IMAGE)
    returned = time.monotonic() - start
    served(port, start + 600)
    page = time.monotonic() - start
    config = json.loads(fcvm("inspect", name))[0]["config"]
    fcvm("stop", name)
    fcvm("rm", name)
    return returned, page, str(config["start"]["from"])


def wait_for_entries() -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        data = json.loads(fcvm("snapshot", "ls", "--json"))
        if {s["info"].get("level") for s in data["snapshots"] if s["kind"] == "cache"} == {"startup", "prestart"}:
            return
        time.sleep(0.5)
    raise SystemExit("the cold run left no startup and pre-start entries")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-warm-", dir="/var/lib/fcvm"))
    os.environ["FCVM_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("FCVM_ASSETS_DIR", "/var/lib/fcvm/assets")
    try:
        results: dict[str, list[tuple[float, float, str]]] = {"cold": [], "startup": [], "prestart": []}
        first = one_run("web", "-e", "GREETING=first")
        wait_for_entries()
        for index in range(args.runs):
            results["cold"].append(one_run("web", "-e", "GREETING=first", "--no-snapshot"))
            results["startup"].append(one_run("web", "-e", "GREETING=first"))
            results["prestart"].append(one_run(f"other{index}", "-e", f"GREETING=other{index}"))
    finally:
        subprocess.run([sys.executable, "-m", "fcvm", "snapshot", "prune", "--all"], capture_output=True, check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
    cold_page = statistics.median(r[1] for r in results["cold"])
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; runs per case: {args.runs}")
    print(f"first run (fills the cache): returned {first[0]:.2f} s, page {first[1]:.2f} s")
    print(f"{'case':<10} {'from':<9} {'run -d returned':>16} {'page served':>12} {'vs cold':>8}")
    for case, runs in results.items():
        returned = statistics.median(r[0] for r in runs)
        page = statistics.median(r[1] for r in runs)
        origins = ",".join(sorted({r[2] for r in runs}))
        print(f"{case:<10} {origins:<9} {returned:>15.2f}s {page:>11.2f}s {page / cold_page:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
