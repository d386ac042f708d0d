"""Wall time of `fcvm --help` and `fcvm ls` with 100 VM rows, against a bare `python3 -c pass` anchor.

Run: python3 bench/cli_latency.py [--runs N]
Target: `fcvm ls` with 100 rows under 80 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _time(argv: list[str], env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "FCVM_DATA_DIR": data_dir}
        # Rows owned by this (live) process, so `ls` shows all 100 and reaps none.
        seed = (
            "from fcvm.core.proc import ProcessRef; from fcvm.state import Store; import sys\n"
            "s = Store(); me = ProcessRef.of(int(sys.argv[1]))\n"
            "for i in range(100):\n"
            "    vm = s.create_vm(f'vm{i}', process=me, image='localhost/web', hypervisor='qemu')\n"
            "    s.update_vm(vm.id, status='running', health='healthy',"
            " ports=[{'host_ip': '', 'host_port': 8000 + i, 'guest_port': 80, 'protocol': 'tcp'}])\n"
        )
        subprocess.run([sys.executable, "-c", seed, str(os.getpid())], env=env, check=True)
        anchor = _time([sys.executable, "-c", "pass"], env, args.runs)
        help_ms = _time([sys.executable, "-m", "fcvm", "--help"], env, args.runs)
        ls_ms = _time([sys.executable, "-m", "fcvm", "ls"], env, args.runs)
    print(f"python3 -c pass (anchor)   {anchor:6.1f} ms")
    print(f"fcvm --help                {help_ms:6.1f} ms  ({help_ms / anchor:.2f}x anchor)")
    print(f"fcvm ls (100 rows)         {ls_ms:6.1f} ms  ({ls_ms / anchor:.2f}x anchor; target < 80 ms:"
          f" {'met' if ls_ms < 80 else 'NOT met'})")


if __name__ == "__main__":
    main()
