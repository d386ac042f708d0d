"""`fcvm serve` through the official E2B SDK: create from a snapshot template to the first command's output (p50
over N), the `commands.run("true")` round trip, and a 1 MiB write then read; with no machines started ahead and
with `--pool 1`. The anchor, in the same run: the same clone through the CLI, `fcvm snapshot run --snapshot TPL
--exec 'echo first'` (one process: restore, run, print, clean up), so the ratio is what the API adds or saves.

Run (root, guest assets built): python3 bench/sandbox_api.py [--runs 10] [--pools 0,1] [--image IMAGE]
It starts its own servers and template in a scratch data dir and removes them.
Target: create to first output p50 <= 1 s under TCG (E2B quotes ~80-500 ms on KVM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fcvm.core import paths


def _fcvm(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "fcvm", *args], env=env, check=True, capture_output=True,
                          text=True, timeout=900).stdout


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    return (f"p50 {statistics.median(ordered) * 1000:7.0f} ms   min {ordered[0] * 1000:7.0f} ms   "
            f"max {ordered[-1] * 1000:7.0f} ms   (n={len(ordered)})")


def measure(runs: int) -> dict[str, list[float]]:
    from e2b import Sandbox

    results: dict[str, list[float]] = {"create_to_first_output": [], "run_true": [], "write_1mib": [],
                                       "read_1mib": []}
    payload = os.urandom(1 << 20)
    for _ in range(runs):
        start = time.perf_counter()
        sandbox = Sandbox.create(template="bench-tpl")
        output = sandbox.commands.run("echo first").stdout
        results["create_to_first_output"].append(time.perf_counter() - start)
        assert output == "first\n", output
        try:
            for _ in range(3):
                start = time.perf_counter()
                sandbox.commands.run("true")
                results["run_true"].append(time.perf_counter() - start)
            start = time.perf_counter()
            sandbox.files.write("/tmp/bench.bin", payload)
            results["write_1mib"].append(time.perf_counter() - start)
            start = time.perf_counter()
            back = sandbox.files.read("/tmp/bench.bin", format="bytes")
            results["read_1mib"].append(time.perf_counter() - start)
            assert bytes(back) == payload
        finally:
            sandbox.kill()
    return results


def measure_anchor(env: dict[str, str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        output = _fcvm(env, "snapshot", "run", "--snapshot", "bench-tpl", "--exec", "echo first")
        samples.append(time.perf_counter() - start)
        assert output == "first\n", output
    return samples


def _serve(env: dict[str, str], pool: int) -> subprocess.Popen[str]:
    key, port = "e2b_" + os.urandom(20).hex(), _port()
    server = subprocess.Popen([sys.executable, "-m", "fcvm", "serve", "--listen", f"127.0.0.1:{port}", "--pool",
                               str(pool)], env={**env, "FCVM_API_KEY": key}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None and server.stdout.readline().startswith("export ")
    url = f"http://127.0.0.1:{port}"
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=key)
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--pools", default="0,1", help="comma-separated --pool values to measure")
    parser.add_argument("--image", default="localhost/fcvm-busybox")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-serve-", dir=paths.data_dir()))
    env = {**os.environ, "FCVM_DATA_DIR": str(data_dir),
           "FCVM_ASSETS_DIR": os.environ.get("FCVM_ASSETS_DIR", str(paths.assets_dir()))}
    measured: dict[int, dict[str, list[float]]] = {}
    anchor: list[float] = []
    try:
        # A cold boot (a warm start cannot be snapshotted), snapshotted as the template.
        _fcvm(env, "podman", "run", "-d", "--no-snapshot", "--name", "bench-src", args.image, "sleep", "1000000")
        _fcvm(env, "snapshot", "create", "bench-src", "--tag", "bench-tpl")
        _fcvm(env, "stop", "bench-src")
        anchor = measure_anchor(env, args.runs)
        for pool in (int(p) for p in args.pools.split(",")):
            server = _serve(env, pool)
            try:
                measured[pool] = measure(args.runs)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=300)
    finally:
        for row in json.loads(_fcvm(env, "ls", "--json")):
            _fcvm(env, "stop", str(row["name"]))
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"anchor: fcvm snapshot run --exec 'echo first'   {_ms(anchor)}")
    for pool, results in measured.items():
        print(f"--pool {pool}")
        for name, samples in results.items():
            print(f"  {name:24s} {_ms(samples)}")
        p50 = statistics.median(results["create_to_first_output"])
        print(f"  create to first output / anchor: {p50 / statistics.median(anchor):.2f}x")
        print(f"  target: create to first output p50 <= 1 s: {'met' if p50 <= 1 else 'NOT met'} ({p50:.2f} s)")


if __name__ == "__main__":
    main()
