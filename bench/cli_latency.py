"""Wall time of `fcvm --help` and `fcvm ls` with 100 VM rows, against `python -c pass` of the same interpreter.

Run: python3 bench/cli_latency.py [--runs N] [--sources DIR]   (DIR: another checkout's src/, e.g. to compare)
Goal: `fcvm ls` with 100 rows at most 3x the anchor, then at most 2x, measured as `python -m fcvm ls`. The `fcvm`
console script, as pip writes it, is measured too: it skips runpy (which `-m` needs) but always imports re.

The anchor is a bare `python -c pass` of the interpreter fcvm runs under (`sys.executable`), but in a fresh venv
of it, where fcvm's sources are found through a .pth file like an installed package's. `site` runs as usual (no
`-S`), yet only the venv's own site-packages are read. Why not the interpreter as it is: a .pth file in its
site-packages may import things at every start (on this machine one imports certifi, 17 ms); that cost would be
in both figures and hide what fcvm itself adds. `-I` does not help: it drops the user site and PYTHON* variables,
not the interpreter's own site-packages. The ratio against the installed interpreter is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[1] / "src"
GOALS = (3.0, 2.0)
# What `python -m fcvm ls` imports whatever fcvm does: runpy for -m, sqlite3 for the store, json for its columns (and
# with json, re and enum). No fcvm code, no query.
FLOOR = "import runpy, sqlite3, json"


def _medians(commands: dict[str, list[str]], env: dict[str, str], runs: int) -> dict[str, float]:
    """Median wall time of each command in ms. Runs are interleaved, so load from elsewhere hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(runs + 1):  # round 0 warms the caches
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            if round_:
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def _clean_python(where: Path, sources: Path) -> str:
    """A venv of sys.executable whose only extra path is fcvm's sources."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    (Path(site_packages) / "fcvm-sources.pth").write_text(f"{sources}\n")
    return str(python)


def _console_script(python: str) -> str:
    """The `fcvm` script pip writes for fcvm's console_scripts entry point (distlib's template), beside `python`."""
    script = Path(python).with_name("fcvm")
    script.write_text(
        f"#!{python}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\nfrom fcvm.cli.main import main\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        "    sys.exit(main())\n"
    )
    script.chmod(0o755)
    return str(script)


def _seed_rows(python: str, env: dict[str, str]) -> None:
    """100 running rows owned by this (live) process, so `ls` shows them all and reaps none."""
    seed = (
        "from fcvm.core.proc import ProcessRef; from fcvm.state import Store; import sys\n"
        "s = Store(); me = ProcessRef.of(int(sys.argv[1]))\n"
        "for i in range(100):\n"
        "    vm = s.create_vm(f'vm{i}', process=me, image='localhost/web', hypervisor='qemu')\n"
        "    s.update_vm(vm.id, status='running', health='healthy',"
        " ports=[{'host_ip': '', 'host_port': 8000 + i, 'guest_port': 80, 'protocol': 'tcp'}])\n"
    )
    subprocess.run([python, "-c", seed, str(os.getpid())], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sources", type=Path, default=SOURCES, help="the src/ directory to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        python = _clean_python(Path(scratch) / "venv", args.sources.resolve())
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
        env["FCVM_DATA_DIR"] = str(Path(scratch) / "data")
        _seed_rows(python, env)
        ms = _medians({"installed": [sys.executable, "-c", "pass"], "anchor": [python, "-c", "pass"],
                       "help": [python, "-m", "fcvm", "--help"], "ls": [python, "-m", "fcvm", "ls"],
                       "script": [_console_script(python), "ls"], "floor": [python, "-c", FLOOR]}, env, args.runs)
    installed, anchor, help_ms, ls_ms, script_ms = ms["installed"], ms["anchor"], ms["help"], ms["ls"], ms["script"]
    floor = ms["floor"]
    ratio = ls_ms / anchor
    goals = ", ".join(f"<= {goal:g}x {'met' if ratio <= goal else 'NOT met'}" for goal in GOALS)
    print(f"interpreter: {sys.executable} ({sys.version.split()[0]}), fcvm from {args.sources},"
          f" median of {args.runs} runs")
    print(f"python -c pass, installed site     {installed:6.1f} ms  (for reference: its .pth files included)")
    print(f"python -c pass, clean venv (anchor) {anchor:6.1f} ms")
    print(f"fcvm --help                         {help_ms:6.1f} ms  ({help_ms / anchor:.2f}x anchor)")
    print(f"fcvm ls (100 rows)                  {ls_ms:6.1f} ms  ({ratio:.2f}x anchor; goal {goals})")
    print(f"fcvm ls (100 rows), console script  {script_ms:6.1f} ms  ({script_ms / anchor:.2f}x anchor)")
    print(f"floor of `python -m fcvm ls`        {floor:6.1f} ms  ({floor / anchor:.2f}x anchor: {FLOOR})")


if __name__ == "__main__":
    main()
