"""Where a fuse-pipe write run's time goes, from the kernel's own tracepoints: bench/fusepipe.py's write load on a
warm mount, each run traced with `fuse:fuse_request_send`/`fuse_request_end` and `jbd2:jbd2_commit_locking`.

    sudo python3 bench/fusepipe_trace.py [REV_OR_SRC ...] [--runs 3] [--writes 256] [--writers 32]

Per version (a git revision or a src directory, as in bench/fusepipe_ab.py; none: this tree) and run, it prints
the run's time against the host's, the requests the guest kernel sent per written file and the median round trip
of each, and the chain: the creates of one directory queue on the kernel's directory lock, so the time from one
CREATE reply to the next is what a run is made of. Links over 1 ms are stalls; the count of them that overlap a
journal commit says whether the host's commits are what holds them. Journal commits and disk flushes per run come
from /proc/fs/jbd2 and the loop device's /sys/block stat, next to the host's own for the same load.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusepipe as fp
import fusepipe_ab as ab

TRACING = Path("/sys/kernel/tracing")
EVENTS = ("fuse/fuse_request_send", "fuse/fuse_request_end", "jbd2/jbd2_commit_locking")
STALL_US = 1000.0
_LINE = re.compile(r"\s(\d+\.\d+): (fuse_request_send|fuse_request_end|jbd2_commit_locking): (.*)")
_SEND = re.compile(r"req (\d+) opcode \d+ \(FUSE_(\w+)\)")
_END = re.compile(r"req (\d+)")


class Disk(NamedTuple):
    commits: int
    flushes: int


def disk_counters(device: str) -> Disk:
    stat = (Path("/sys/block") / device / "stat").read_text().split()
    return Disk(ab.journal_commits(device), int(stat[15]))  # field 16: flush requests completed


def tracing(on: bool) -> None:
    if on:
        (TRACING / "trace").write_text("")
        (TRACING / "buffer_size_kb").write_text("65536")
    for event in EVENTS:
        (TRACING / "events" / event / "enable").write_text("1" if on else "0")
    (TRACING / "tracing_on").write_text("1" if on else "0")


def analyse(trace: str) -> str:
    """The per-file requests, their round trips and the create chain of one traced run."""
    opcode: dict[str, str] = {}
    sent: dict[str, float] = {}
    round_trips: dict[str, list[float]] = {}
    create_ends: list[float] = []
    commits: list[float] = []
    for line in trace.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        ts, kind, rest = float(m.group(1)) * 1e6, m.group(2), m.group(3)
        if kind == "fuse_request_send":
            s = _SEND.search(rest)
            if s is not None:
                opcode[s.group(1)], sent[s.group(1)] = s.group(2), ts
        elif kind == "fuse_request_end":
            e = _END.search(rest)
            if e is not None and e.group(1) in sent:
                name = opcode[e.group(1)]
                round_trips.setdefault(name, []).append(ts - sent[e.group(1)])
                if name == "CREATE":
                    create_ends.append(ts)
        else:
            commits.append(ts)
    files = max(len(create_ends), 1)
    counts = Counter(opcode.values())
    requests = ", ".join(f"{name} {counts[name] / files:.1f} ({statistics.median(round_trips[name]):.0f} us)"
                         for name, _ in counts.most_common() if name in round_trips)
    links = list(itertools.pairwise(create_ends))
    if not links:
        return f"    requests per file (median round trip): {requests}"
    lengths = [b - a for a, b in links]
    stalls = [(a, b) for a, b in links if b - a > STALL_US]
    others = [(a, b) for a, b in links if b - a <= STALL_US]

    def with_commit(spans: list[tuple[float, float]]) -> int:
        return sum(1 for a, b in spans if any(a < c < b for c in commits))

    return (f"    requests per file (median round trip): {requests}\n"
            f"    chain: CREATE reply to the next median {statistics.median(lengths):.0f} us, mean "
            f"{statistics.mean(lengths):.0f} us; {len(stalls)} stalls over {STALL_US / 1000:.0f} ms "
            f"({sum(b - a for a, b in stalls) / 1000:.1f} ms in all), {with_commit(stalls)} of them with a journal "
            f"commit starting inside (of the other links: {with_commit(others)} of {len(others)})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("versions", nargs="*", help="git revisions or src directories (default: this tree)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--writes", type=int, default=256)
    ap.add_argument("--writers", type=int, default=32)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (mount, tracefs)", file=sys.stderr)
        return 1
    if not (TRACING / "events" / "fuse").is_dir():
        print(f"no fuse tracepoints in {TRACING} (kernel >= 6.13, tracefs mounted)", file=sys.stderr)
        return 1
    with fp.workspace("fp-trace-", 0) as ws:
        device = ab.loop_device(ws.src)
        versions: list[tuple[str, str | None]] = [(v, ab.export(v, ws.base)) for v in args.versions]
        versions = versions or [("this tree", None)]
        made = 0

        def write_run(target: Path) -> tuple[float, Disk]:
            nonlocal made
            made += 1
            (ws.src / f"w{made}").mkdir()
            before = disk_counters(device)
            ms = fp.run(ws.driver, "write", target / f"w{made}", args.writes, args.writers)
            after = disk_counters(device)
            return ms, Disk(after.commits - before.commits, after.flushes - before.flushes)

        host = [write_run(ws.src) for _ in range(args.runs)]
        anchor = statistics.median(ms for ms, _ in host)
        print(f"host: {args.writes}x create+4KB write+fsync by {args.writers} threads, median {anchor:.1f} ms; "
              f"per run {[d.commits for _, d in host]} journal commits, {[d.flushes for _, d in host]} flushes")
        for name, pythonpath in versions:
            with fp.fusepipe(ws.src, ws.mnt, ws.sock, 1, pythonpath=pythonpath):
                write_run(ws.mnt)  # warm-up: the mount's first files
                for _ in range(args.runs):
                    tracing(True)
                    try:
                        ms, disk = write_run(ws.mnt)
                    finally:
                        tracing(False)
                    print(f"  {name}: {ms:.1f} ms ({ms / anchor:.1f}x), {disk.commits} journal commits, "
                          f"{disk.flushes} flushes")
                    print(analyse((TRACING / "trace").read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
