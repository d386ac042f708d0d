"""UFFD page server benchmark: prints every ratio in one run (see docs/PERFORMANCE.md).

    python bench/uffd.py [--size-mib 512] [--clients 8] [--cases single,prefetch,many,sparse] [--json results.json]

1. One client touching all of the memory file, sequentially and randomly, with one touch thread:
   throughput and per-touch latency for the kernel baseline (Firecracker's File backend: MAP_PRIVATE of
   the memory file, touched by the same code) and for the UFFD server at several fault-around windows;
   server-side fault service latency from the server's histogram. Also, in-process: the harness's own
   per-touch cost on present memory and the raw UFFDIO_COPY rate (no faults), i.e. the ceiling.
2. Working-set prefetch: a first client records a scattered working set; a second replays it right
   after its handshake while the server prefetches it; a third waits for the prefetch first.
3. N clients at once: aggregate throughput and worst p99; then, with all of them holding their memory,
   RSS/PSS of the server and each client, against N File-backend clients (which really share pages).
4. Sparse vs dense: a memory file that is 25 % data in 2 MiB chunks, the rest holes, against the same
   bytes written out densely (what Firecracker writes before holes are dug). One client touching all of
   it: throughput, and the client's private memory while it holds it (holes map the shared zero page).
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fcvm.uffd import ioctls, memory
from fcvm_standins.uffd_client import Toucher, anonymous_bytes, percentiles

MiB = 1 << 20
PAGE = 4096


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_file(path: Path, size: int) -> None:
    rng = random.Random(42)
    with path.open("wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(rng.randbytes(8 * MiB))
    path.read_bytes()  # warm the page cache: both sides read from it


def make_sparse_pair(work: Path, size: int, chunk: int = 2 * MiB, share: float = 0.25) -> tuple[Path, Path, int]:
    """(sparse file, dense file with the same bytes, data bytes): `share` of the chunk slots hold random
    bytes, chosen at random through the file; the other slots are holes in the sparse file."""
    rng = random.Random(42)
    slots = size // chunk
    chosen = sorted(rng.sample(range(slots), round(slots * share)))
    sparse, dense = work / "sparse", work / "dense"
    with sparse.open("wb") as f:
        f.truncate(size)
        for slot in chosen:
            os.pwrite(f.fileno(), rng.randbytes(chunk), slot * chunk)
    with sparse.open("rb") as src, dense.open("wb") as dst:
        shutil.copyfileobj(src, dst, 8 * MiB)  # writes the zeros too: no holes
    for path in (sparse, dense):
        path.read_bytes()  # warm the page cache
    return sparse, dense, len(chosen) * chunk


def smaps(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


class Server:
    def __init__(self, work: Path, mem: Path, *args: str) -> None:
        self.socket = work / f"s{time.monotonic_ns()}.sock"
        self.metrics = work / f"m{time.monotonic_ns()}.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fcvm", "--log-level", "warning", "snapshot", "serve", "--mem-file", str(mem),
             "--socket", str(self.socket), "--metrics-json", str(self.metrics), *args],
        )
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise SystemExit("server failed to start")
            time.sleep(0.01)

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return json.loads(self.metrics.read_text())


def client(mem: Path, server: Server | None, *args: str, hold: bool = False) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "fcvm_standins.uffd_client", "--mem-file", str(mem), "--threads", "1", *args]
    if server is None:
        cmd += ["--backend", "file"]
    else:
        cmd += ["--socket", str(server.socket)]
    if hold:
        cmd += ["--hold", "-1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def report_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"client {proc.pid} produced no report (exit {proc.wait()})")
    report = json.loads(line)
    if not report["ok"]:
        raise SystemExit(f"client {proc.pid} failed verification: {report}")
    return report


def run_one(mem: Path, server: Server | None, *args: str) -> dict[str, Any]:
    proc = client(mem, server, *args)
    report = report_of(proc)
    proc.wait(60)
    return report


def in_process_ceilings(mem: Path, size: int) -> dict[str, float]:
    """Harness touch cost on present memory, and UFFDIO_COPY throughput with no faults at all."""
    buf = memory.map_memory(size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ctypes.memset(buf, 1, size)
    addrs = array.array("Q", range(buf, buf + size, PAGE))
    toucher = Toucher(1, True)
    seconds = toucher.run(addrs)
    touch = percentiles(toucher.latencies[0])
    memory.unmap(buf, size)
    fd = os.open(mem, os.O_RDONLY)
    src = memory.map_file_readonly(fd, size)
    os.close(fd)
    out = {"harness_touch_ns_per_page": round(seconds / len(addrs) * 1e9, 1), "harness_touch_p50_us": touch["p50_us"]}
    for window in (64 * 1024, MiB):
        uffd = ioctls.create()
        ioctls.api(uffd)
        dst = memory.map_memory(size, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | memory.MAP_NORESERVE)
        ioctls.register(uffd, dst, size)
        copier = ioctls.Copier()
        t0 = time.perf_counter()
        for off in range(0, size, window):
            copier.copy(uffd, dst + off, src + off, window)
        out[f"copy_ceiling_{window // 1024}K_mb_s"] = round(size / (time.perf_counter() - t0) / 1e6)
        memory.unmap(dst, size)
        os.close(uffd)
    memory.unmap(src, size)
    return out


def single_client(mem: Path, work: Path, windows: list[str], write_windows: list[str]) -> dict[str, Any]:
    """Kernel baseline vs UFFD per pattern; `read` touches (the spec's baseline: page-cache pages mapped
    shared) and `write` touches (private copies on both sides: copy-on-write vs UFFDIO_COPY)."""
    results: dict[str, Any] = {}
    servers = {w: Server(work, mem, "--prefetch", "off", "--fault-around", w)
               for w in dict.fromkeys(windows + write_windows)}
    try:
        for touch, wins in (("read", windows), ("write", write_windows)):
            for pattern in ("sequential", "random"):
                row: dict[str, Any] = {}
                rep = run_one(mem, None, "--pattern", pattern, "--touch", touch)
                row["kernel"] = {"mb_s": rep["mb_s"], "touch": rep["touch_latency"]}
                log(f"  {touch:5} {pattern:10} kernel File backend   {rep['mb_s']:8.0f} MB/s  touch p50 "
                    f"{rep['touch_latency']['p50_us']} us p99 {rep['touch_latency']['p99_us']} us")
                for window in wins:
                    rep = run_one(mem, servers[window], "--pattern", pattern, "--touch", touch)
                    row[window] = {"mb_s": rep["mb_s"], "touch": rep["touch_latency"], "pid": rep["pid"],
                                   "ratio": round(rep["mb_s"] / row["kernel"]["mb_s"], 3)}
                    log(f"  {touch:5} {pattern:10} uffd fault-around {window:>4} {rep['mb_s']:8.0f} MB/s  ratio "
                        f"{row[window]['ratio']:.2f}  touch p50 {rep['touch_latency']['p50_us']} us "
                        f"p99 {rep['touch_latency']['p99_us']} us")
                results[f"{touch}_{pattern}"] = row
    finally:
        metrics = {w: srv.stop() for w, srv in servers.items()}
    for w, m in metrics.items():  # server-side fault service latency, matched to each run by pid
        by_pid = {c["pid"]: c for c in m["clients"]}
        for row in results.values():
            if w in row and row[w]["pid"] in by_pid:
                c = by_pid[row[w]["pid"]]
                row[w].update(faults=c["faults"], fault_p50_us=c["latency"]["p50_us"],
                              fault_p99_us=c["latency"]["p99_us"])
    for name, row in results.items():
        log(f"  server-side faults {name}: " + ", ".join(
            f"{w}: {r['faults']} faults p50 {r['fault_p50_us']} us p99 {r['fault_p99_us']} us"
            for w, r in row.items() if w != "kernel"))
    return results


def prefetch(mem: Path, work: Path, fraction: float) -> dict[str, Any]:
    ws = mem.with_name(mem.name + ".working-set")
    ws.unlink(missing_ok=True)
    server = Server(work, mem, "--prefetch", "on", "--fault-around", "64K")
    first = run_one(mem, server, "--pattern", "random", "--fraction", str(fraction), "--no-latency")
    while not ws.exists():
        time.sleep(0.01)
    second = run_one(mem, server, "--pattern", "working-set")
    third = run_one(mem, server, "--pattern", "working-set", "--delay", "1")
    metrics = server.stop()
    rec, c2, c3 = metrics["clients"]
    ws_bytes = metrics["server"]["working_set_bytes"]
    out = {
        "working_set_mib": ws_bytes / MiB, "recorded_runs_from_pages": first["pages_touched"],
        "recording_client_mb_s": first["mb_s"],
        "replay_immediate": {"client_mb_s": second["mb_s"], "touch": second["touch_latency"],
                             "prefetch_mb_s": c2.get("prefetch_mb_s"), "prefetch_bytes": c2["prefetch_bytes"],
                             "demand_faults": c2["faults"], "demand_bytes": c2["bytes_copied"],
                             "effective_population_mb_s": round(ws_bytes / c2["prefetch_seconds"] / 1e6)
                             if c2["prefetch_seconds"] else None},
        "replay_after_prefetch": {"client_mb_s": third["mb_s"], "touch": third["touch_latency"],
                                  "demand_faults": c3["faults"], "prefetch_mb_s": c3.get("prefetch_mb_s")},
        "recorder_faults": rec["faults"],
    }
    log(f"  working set {ws_bytes / MiB:.0f} MiB; replay right after handshake: client {second['mb_s']:.0f} MB/s, "
        f"prefetch {c2.get('prefetch_mb_s')} MB/s, demand faults {c2['faults']}; after prefetch: client "
        f"{third['mb_s']:.0f} MB/s, demand faults {c3['faults']}")
    return out


def many(mem: Path, work: Path, n: int, size: int) -> dict[str, Any]:
    server = Server(work, mem, "--prefetch", "off", "--fault-around", "64K")
    procs = [client(mem, server, "--pattern", "random", "--seed", str(i), hold=True) for i in range(n)]
    reports = [report_of(p) for p in procs]
    start = min(r["touch_start"] for r in reports)
    end = max(r["touch_end"] for r in reports)
    server_mem = smaps(server.proc.pid)
    client_mem = [smaps(p.pid) for p in procs]
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    metrics = server.stop()
    file_procs = [client(mem, None, "--pattern", "random", "--seed", str(i), hold=True) for i in range(n)]
    for p in file_procs:
        report_of(p)
    file_mem = [smaps(p.pid) for p in file_procs]
    for p in file_procs:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    out = {
        "clients": n,
        "aggregate_mb_s": round(n * size / (end - start) / 1e6),
        "worst_touch_p99_us": max(r["touch_latency"]["p99_us"] for r in reports),
        "worst_fault_p99_us": max(c["latency"]["p99_us"] for c in metrics["clients"]),
        "server_rss_mib": round(server_mem["Rss"] / MiB, 1), "server_pss_mib": round(server_mem["Pss"] / MiB, 1),
        "uffd_client_rss_mib": [round(m["Rss"] / MiB, 1) for m in client_mem],
        "uffd_client_pss_mib": [round(m["Pss"] / MiB, 1) for m in client_mem],
        "uffd_client_pss_anon_mib": [round(m.get("Pss_Anon", 0) / MiB, 1) for m in client_mem],
        "file_client_rss_mib": [round(m["Rss"] / MiB, 1) for m in file_mem],
        "file_client_pss_mib": [round(m["Pss"] / MiB, 1) for m in file_mem],
        "uffd_total_pss_mib": round(sum(m["Pss"] for m in client_mem) / MiB + server_mem["Pss"] / MiB),
        "file_total_pss_mib": round(sum(m["Pss"] for m in file_mem) / MiB),
    }
    log(f"  {n} clients: aggregate {out['aggregate_mb_s']} MB/s, worst touch p99 {out['worst_touch_p99_us']} us, "
        f"worst server fault p99 {out['worst_fault_p99_us']} us")
    log(f"  memory: UFFD clients PSS {out['uffd_client_pss_mib']} MiB each + server PSS "
        f"{out['server_pss_mib']} MiB = {out['uffd_total_pss_mib']} MiB; File backend clients PSS "
        f"{out['file_client_pss_mib']} MiB each = {out['file_total_pss_mib']} MiB")
    return out


def sparse_vs_dense(work: Path, size: int) -> dict[str, Any]:
    """One client (one touch thread, 64K fault-around) touching all of a sparse file vs its dense twin."""
    sparse, dense, data = make_sparse_pair(work, size)
    out: dict[str, Any] = {"data_mib": data / MiB, "size_mib": size / MiB}
    for kind, mem in (("sparse", sparse), ("dense", dense)):
        server = Server(work, mem, "--prefetch", "off", "--fault-around", "64K")
        runs: dict[str, Any] = {}
        try:
            for pattern in ("sequential", "random"):
                proc = client(mem, server, "--pattern", pattern, hold=True)
                rep = report_of(proc)
                rollup = smaps(proc.pid)
                runs[pattern] = {
                    "pid": rep["pid"], "mb_s": rep["mb_s"], "touch": rep["touch_latency"],
                    "guest_anon_mib": round(anonymous_bytes(proc.pid, rep["regions"][0]) / MiB, 1),
                    "client_pss_mib": round(rollup["Pss"] / MiB, 1),
                    "client_anon_mib": round(rollup["Anonymous"] / MiB, 1),
                }
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            server_pss = round(smaps(server.proc.pid)["Pss"] / MiB, 1)
        finally:
            metrics = server.stop()
        by_pid = {c["pid"]: c for c in metrics["clients"]}
        for pattern, run in runs.items():
            c = by_pid[run.pop("pid")]
            run.update(faults=c["faults"], zero_faults=c["zero_faults"], copied_mib=c["bytes_copied"] / MiB,
                       zero_mib=c["zero_bytes"] / MiB, fault_p50_us=c["latency"]["p50_us"],
                       fault_p99_us=c["latency"]["p99_us"])
            log(f"  {kind:6} {pattern:10} {run['mb_s']:8.0f} MB/s, guest memory anonymous {run['guest_anon_mib']} MiB, "
                f"client PSS {run['client_pss_mib']} MiB; {run['faults']} faults ({run['zero_faults']} zero-page), "
                f"copied {run['copied_mib']:.0f} MiB, zero {run['zero_mib']:.0f} MiB, "
                f"fault p50 {run['fault_p50_us']} us p99 {run['fault_p99_us']} us")
        out[kind] = {**runs, "server_pss_mib": server_pss}
    for pattern in ("sequential", "random"):
        s, d = out["sparse"][pattern], out["dense"][pattern]
        out[f"{pattern}_ratios"] = {
            "mb_s": round(s["mb_s"] / d["mb_s"], 2),
            "guest_anon": round(s["guest_anon_mib"] / max(d["guest_anon_mib"], 0.1), 3),
            "client_pss": round(s["client_pss_mib"] / d["client_pss_mib"], 3),
        }
        log(f"  {pattern}: sparse / dense = {out[f'{pattern}_ratios']}")
    out["server_pss_ratio"] = round(out["sparse"]["server_pss_mib"] / out["dense"]["server_pss_mib"], 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--windows", default="4K,64K,1M", help="fault-around sizes to compare (read touches)")
    parser.add_argument("--write-windows", default="64K,1M", help="fault-around sizes for write touches")
    parser.add_argument("--ws-fraction", type=float, default=0.02,
                        help="share of random pages the recording client touches")
    parser.add_argument("--cases", default="single,prefetch,many,sparse",
                        help="which cases to run (comma-separated: single, prefetch, many, sparse)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one under /var/tmp)")
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args()
    size = args.size_mib * MiB
    cases = set(args.cases.split(","))
    if not cases <= {"single", "prefetch", "many", "sparse"}:
        parser.error(f"unknown case in --cases {args.cases}")
    work = Path(tempfile.mkdtemp(prefix="fcvm-uffd-bench-", dir=args.dir or "/var/tmp"))
    os.environ["FCVM_DATA_DIR"] = str(work / "data")
    results: dict[str, Any] = {"size_mib": args.size_mib, "cpus": os.cpu_count(),
                               "loadavg_before": os.getloadavg()[0]}
    try:
        mem = work / "memory"
        if cases & {"single", "prefetch", "many"}:
            log(f"memory file: {args.size_mib} MiB of random bytes in {work}")
            make_file(mem, size)
        if "single" in cases:
            log("ceilings (in-process):")
            results["ceilings"] = in_process_ceilings(mem, size)
            log(f"  {results['ceilings']}")
            log("one client, one touch thread, all pages:")
            results["single"] = single_client(mem, work, args.windows.split(","), args.write_windows.split(","))
        if "prefetch" in cases:
            log("working-set prefetch:")
            results["prefetch"] = prefetch(mem, work, args.ws_fraction)
        if "many" in cases:
            log(f"{args.clients} concurrent clients (random, 64K fault-around), then memory:")
            results["many"] = many(mem, work, args.clients, size)
        mem.unlink(missing_ok=True)  # the sparse case needs the page cache, not this file
        if "sparse" in cases:
            log(f"sparse vs dense ({args.size_mib} MiB, 25 % data in 2 MiB chunks), one client, all pages:")
            results["sparse"] = sparse_vs_dense(work, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_after"] = os.getloadavg()[0]
    summary: dict[str, Any] = {}
    if "single" in results:
        single = results["single"]
        summary.update({
            f"{name}_{w}_vs_kernel": row[w]["ratio"] for name, row in single.items() for w in row if w != "kernel"
        })
    if "prefetch" in results:
        pf = results["prefetch"]["replay_immediate"]
        summary["prefetch_effective_population_gb_s"] = (pf["effective_population_mb_s"] or 0) / 1000
        summary["prefetch_replay_client_gb_s"] = pf["client_mb_s"] / 1000
    if "many" in results:
        summary.update({
            f"{args.clients}_clients_aggregate_gb_s": results["many"]["aggregate_mb_s"] / 1000,
            f"{args.clients}_clients_worst_touch_p99_us": results["many"]["worst_touch_p99_us"],
            "pss_uffd_over_file_backend": round(results["many"]["uffd_total_pss_mib"]
                                                / max(1, results["many"]["file_total_pss_mib"]), 2),
        })
    if "sparse" in results:
        sp = results["sparse"]
        for pattern in ("sequential", "random"):
            for key, value in sp[f"{pattern}_ratios"].items():
                summary[f"sparse_over_dense_{pattern}_{key}"] = value
        summary["sparse_over_dense_server_pss"] = sp["server_pss_ratio"]
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
