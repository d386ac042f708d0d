"""A/B of fuse-pipe versions: bench/fusepipe.py's write (or read) load through each version's server and relay,
interleaved in one run on one fresh ext4, against the host's own run of the same load in between.

    sudo python3 bench/fusepipe_ab.py REV_OR_SRC REV_OR_SRC [...] [--reps 8] [--load write|read]

Each version is a git revision of this repository (its `src` is exported to a temporary directory) or a
directory to put on PYTHONPATH. This machine's wall times swing by tens of percent from one run to the next
(host baselines of one run spread 22-80 ms), so a lever is judged here: the versions take turns, in
alternating order, `--reps` times each, and the medians are compared. Write runs also count the journal
commits they caused (/proc/fs/jbd2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

# The sibling bench script: its C driver, loads, mount and fresh ext4.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusepipe as fp

REPO = Path(__file__).resolve().parent.parent


def export(version: str, into: Path) -> str:
    """A PYTHONPATH entry holding `version`'s product code."""
    if Path(version).is_dir():
        return str(Path(version).resolve())
    tree = into / version.replace("/", "_")
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", version, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return str(tree / "src")


def journal_commits(device: str) -> int:
    with open(f"/proc/fs/jbd2/{device}-8/info") as f:
        return int(f.readline().split()[0])


def loop_device(path: Path) -> str:
    """The loop device (its name) of the filesystem holding `path`."""
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--target", str(path)], check=True, capture_output=True,
                            text=True).stdout.strip()
    return os.path.basename(source)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("versions", nargs="+", help="git revisions or src directories, two or more")
    ap.add_argument("--load", choices=("write", "read"), default="write")
    fp.load_arguments(ap, reps=8)
    args = ap.parse_args()
    if len(args.versions) < 2:
        ap.error("name two versions or more")
    if os.geteuid() != 0:
        print("needs root (mount)", file=sys.stderr)
        return 1
    with fp.workspace("fp-ab-", args.files) as ws:
        compare(args, [export(v, ws.base) for v in args.versions], ws)
    return 0


def compare(args: argparse.Namespace, paths: list[str], ws: fp.Workspace) -> None:
    driver, src, reads, mnt, sock = ws.driver, ws.src, ws.reads, ws.mnt, ws.sock
    device = loop_device(src)
    host: list[float] = []
    times: dict[int, list[float]] = {i: [] for i in range(len(paths))}
    commits: dict[int, list[int]] = {i: [] for i in range(len(paths))}
    runs = 0
    for turn in range(args.reps):
        order = list(range(len(paths)))
        if turn % 2:
            order.reverse()
        if args.load == "write":
            (src / f"h{turn}").mkdir()
            host.append(fp.run(driver, "write", src / f"h{turn}", args.writes, args.writers))
        else:
            host.append(fp.run(driver, "read", reads, args.files, args.readers))
        for i in order:
            with fp.fusepipe(src, mnt, sock, 1, pythonpath=paths[i]):  # fresh mount: cold in FUSE
                if args.load == "read":
                    times[i].append(fp.run(driver, "read", mnt / "reads", args.files, args.readers))
                    continue
                runs += 1
                (src / f"w{runs}").mkdir()
                before = journal_commits(device)
                times[i].append(fp.run(driver, "write", mnt / f"w{runs}", args.writes, args.writers))
                commits[i].append(journal_commits(device) - before)
    anchor = statistics.median(host)
    print(f"fuse-pipe A/B, {args.load} load, {args.reps} runs per version, alternated; host median {anchor:.1f} ms "
          f"(raw {[round(t, 1) for t in host]})")
    for i, version in enumerate(args.versions):
        median = statistics.median(times[i])
        line = (f"  {version:24s} median {median:7.1f} ms  ratio {median / anchor:4.1f}x  "
                f"raw {[round(t) for t in times[i]]}")
        if commits[i]:
            line += f"  journal commits {sorted(commits[i])}"
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
