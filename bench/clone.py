"""Snapshots and clones (QEMU): snapshot pause, clone spawn to exec-ready and to the page served (File and Uffd
memory, sequential), 10 clones started in parallel, memory of 10 clones sharing one snapshot, the page server's
working-set prefetch, and the host-side time from `fcvm snapshot run` to `cont`. Anchor: a cold boot of the same
image (`fcvm podman run -d localhost/fcvm-demo-httpd`, 2 vCPUs, 1 GiB), measured the same way in the same run.

Run (root, after scripts/setup-host.sh and `fcvm setup uffd-preload`): python3 bench/clone.py [--clones 10]
[--parallel 10] [--phases file,trace,uffd,par,mem] [--baseline-src DIR ...]. With --baseline-src (the src/ of
another checkout, say the commit before a change; repeatable), the File clones alternate between that code and
this checkout's, and the parallel File clones run with the first and with this one: a before/after under the
same load.
It works in its own data dir (--data-dir, default /var/lib/fcvm/bench-clone: the same btrfs as the assets, so
reflinks work), shares the built assets, stops everything after each phase and removes the data dir at the end.

Every clone is launched as a user would: `python3 -m fcvm snapshot run ... -d`, then `fcvm exec NAME -- true` as
soon as that returns (exec-ready); an HTTP poller started with the launch gives the time the published page is
first served. The source, before its snapshot, writes a 384 MiB file that stays in its page cache (the working
set every clone then reads: pages of the snapshot) and a 128 MiB file it drops from its cache (what a clone
reads into fresh guest pages). With `perf` installed, one more File clone is traced (scheduler tracepoints for
fork, exec and exit, system-wide: no ptrace) to break the host-side time down by process.
Figures and their reading: docs/PERFORMANCE.md, "Snapshots and clones".
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcvm.core import paths

IMAGE = "localhost/fcvm-demo-httpd"
PAGE = "fcvm demo page"
SOURCE = "bench-src"
TAG = "bench-v1"
PHASES = ("file", "trace", "uffd", "par", "mem")
WORKING_SET_MIB = 384
COLD_MIB = 128
MiB = 1 << 20


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load():.2f}] {message}", file=sys.stderr, flush=True)


def load() -> float:
    return os.getloadavg()[0]


def fcvm(*args: str, check: bool = True, timeout: float = 600, src: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    """`python3 -m fcvm ARGS`, from `src` (a checkout's src/ directory) when given."""
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    result = subprocess.run([sys.executable, "-m", "fcvm", *args], capture_output=True, text=True, timeout=timeout,
                            check=False, env=env)
    if check and result.returncode != 0:
        raise SystemExit(f"fcvm {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def inspect(name: str) -> dict[str, Any]:
    return dict(json.loads(fcvm("inspect", name).stdout)[0])


def vmm_pid(name: str) -> int:
    """The VM's QEMU process: its journal entry of kind "process"."""
    return int(next(r["pid"] for r in inspect(name)["resources"] if r["kind"] == "process"))


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def page_served(port: int, start: float, give_up: threading.Event, timeout: float = 180) -> float | None:
    """Seconds from `start` until GET / on the published port returns the demo page (None if `give_up` is set
    first). A new attempt every 25 ms: a SYN sent before the guest runs waits in its TAP queue (or is lost), so
    one attempt alone could lag."""
    done = threading.Event()
    first: list[float] = []
    in_flight = threading.Semaphore(40)

    def attempt() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            conn.request("GET", "/")
            body = conn.getresponse().read().decode(errors="replace")
            conn.close()
            if PAGE in body:
                first.append(time.perf_counter() - start)
                done.set()
        except OSError:
            pass
        finally:
            in_flight.release()

    deadline = start + timeout
    while not done.wait(0.025):
        if give_up.is_set():
            return None
        if time.perf_counter() > deadline:
            raise SystemExit(f"port {port} did not serve the page within {timeout:.0f} s")
        if in_flight.acquire(blocking=False):
            threading.Thread(target=attempt, daemon=True).start()
    return min(first)


def exec_ok(name: str, *, vm: bool = False, deadline: float = 120) -> tuple[float, int]:
    """(seconds until `fcvm exec NAME [--vm] -- true` succeeded, attempts)."""
    start = time.perf_counter()
    attempts = 0
    while True:
        attempts += 1
        if fcvm("exec", name, *(["--vm"] if vm else []), "--", "true", check=False).returncode == 0:
            return time.perf_counter() - start, attempts
        if time.perf_counter() - start > deadline:
            raise SystemExit(f"fcvm exec {name} -- true still fails after {deadline:.0f} s")
        time.sleep(0.05)


def launch(argv: list[str], name: str, port: int, *, run_exec: bool = True, src: Path | None = None
           ) -> dict[str, Any]:
    """Run `fcvm ARGV -d` (from `src` when given) for VM `name` publishing `port`: launch -> returned,
    -> exec-ready, -> page served. A start that fails is recorded (its error in "failed"), not fatal: the summary
    counts it."""
    wall0 = time.time()
    start = time.perf_counter()
    page: list[float | None] = []
    give_up = threading.Event()
    poller = threading.Thread(target=lambda: page.append(page_served(port, start, give_up)), daemon=True)
    poller.start()
    started = fcvm(*argv, timeout=600, check=False, src=src)
    result: dict[str, Any] = {"name": name, "returned": time.perf_counter() - start, "load": load()}
    if started.returncode != 0:
        give_up.set()
        result["failed"] = started.stderr.strip()
        log(f"{name} failed to start: {result['failed']}")
        return result
    if run_exec:
        _, result["exec_attempts"] = exec_ok(name)
        result["exec"] = time.perf_counter() - start
    poller.join()
    result["page"] = page[0]
    row = inspect(name)
    timings = row["config"]["timings"]
    result["timings"] = timings
    result["t0_gap"] = timings["t0_wall"] - wall0  # launch -> the supervisor began (two Python starts)
    if "resumed" in timings:
        result["host_to_cont"] = result["t0_gap"] + timings["resumed"]
    result["owner_pid"] = int(row["pid"])  # the page server knows a clone by it: its supervisor connects for QEMU
    return result


def exec_durations(name: str) -> dict[str, float]:
    """Wall time of one `fcvm exec` into the container and one into the VM, on a running VM."""
    return {"exec_container_s": exec_ok(name)[0], "exec_vm_s": exec_ok(name, vm=True)[0]}


def stop_all(names: list[str]) -> None:
    """`fcvm rm -f` each, all at once (busybox httpd ignores SIGTERM: each takes ~12 s)."""
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        list(pool.map(lambda n: fcvm("rm", "-f", n, check=False), names))


def clone_argv(name: str, port: int, *, serve_pid: int | None) -> list[str]:
    how = ["--pid", str(serve_pid)] if serve_pid else ["--snapshot", TAG]
    return ["snapshot", "run", *how, "--name", name, "-p", f"{port}:80", "-d"]


def snapshots() -> dict[str, Any]:
    return dict(json.loads(fcvm("snapshot", "ls", "--json").stdout))


def snapshot_info(tag: str) -> dict[str, Any]:
    return dict(next(s["info"] for s in snapshots()["snapshots"] if s["name"] == tag))


def server_clients(serve_pid: int) -> dict[int, dict[str, Any]]:
    """The page server's per-client metrics, by client pid (the clone's supervisor, as `fcvm ls` shows it)."""
    data = snapshots()
    servers = [s for snap in data["snapshots"] for s in snap["servers"]] + data["servers"]
    return {c["pid"]: c for s in servers if s["pid"] == serve_pid for c in s["clients"]}


@contextmanager
def page_server(prefetch: str) -> Iterator[int]:
    process = subprocess.Popen([sys.executable, "-m", "fcvm", "snapshot", "serve", TAG, "--prefetch", prefetch],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(s["pid"] == process.pid and s["status"] == "running"
                      for snap in snapshots()["snapshots"] for s in snap["servers"]):
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("the page server did not start")
            time.sleep(0.2)
        yield process.pid
    finally:
        process.send_signal(signal.SIGTERM)  # stops its clones first
        process.wait(timeout=120)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 10 samples is the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


# --- phases ---------------------------------------------------------------------------------------------------


def phase_source(results: dict[str, Any], pause_runs: int) -> None:
    log("anchor: cold boot of the source")
    port = free_port()
    anchor = launch(["podman", "run", "-d", "--name", SOURCE, "-p", f"{port}:80", IMAGE], SOURCE, port)
    anchor.update(exec_durations(SOURCE))
    results["anchor"] = anchor
    log(f"anchor: returned {anchor['returned']:.2f} s, exec-ready {anchor['exec']:.2f} s, page {anchor['page']:.2f} s")

    log(f"snapshot create x{pause_runs} of the idle source")
    idle = []
    for i in range(pause_runs):
        start = time.perf_counter()
        fcvm("snapshot", "create", SOURCE, "--tag", f"bench-idle-{i}")
        wall = time.perf_counter() - start
        idle.append({"pause_s": snapshot_info(f"bench-idle-{i}")["pause_s"], "command_s": wall, "load": load()})
        fcvm("snapshot", "rm", "-f", f"bench-idle-{i}")
    results["pause_idle"] = idle

    log(f"source writes its working set ({WORKING_SET_MIB} MiB cached) and a {COLD_MIB} MiB file it drops")
    fcvm("exec", SOURCE, "--vm", "--", "sh", "-c",
         f"dd if=/dev/urandom of=/root/cold bs=1M count={COLD_MIB} status=none && sync && "
         "echo 3 > /proc/sys/vm/drop_caches && "
         f"dd if=/dev/urandom of=/root/ws bs=1M count={WORKING_SET_MIB} status=none && sync && "
         "dd if=/root/ws of=/dev/null bs=1M status=none")
    results["source_memory"] = rollup(vmm_pid(SOURCE))
    start = time.perf_counter()
    fcvm("snapshot", "create", SOURCE, "--tag", TAG)
    results["pause_dirty"] = {"pause_s": snapshot_info(TAG)["pause_s"], "command_s": time.perf_counter() - start,
                              "load": load()}
    results["snapshot_info"] = snapshot_info(TAG)
    log(f"snapshot {TAG}: pause {results['pause_dirty']['pause_s']:.3f} s")
    # Only the snapshot is needed from here on; an idle TCG guest costs ~9 % of a core.
    stop_all([SOURCE])


def sequential(label: str, count: int, serve_pid: int | None, *, baselines: Sequence[Path] = ()
               ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """`count` clones one after the other (and as many from each of `baselines`, in turn with them): (runs,
    {baseline: its runs})."""
    runs: list[dict[str, Any]] = []
    base_runs: dict[str, list[dict[str, Any]]] = {str(b): [] for b in baselines}
    order = [(i, b, src) for i in range(count) for b, src in [*enumerate(baselines), (None, None)]]
    for i, b, src in order:
        name, port = f"{label}{'' if b is None else f'b{b}-'}{i}", free_port()
        run = launch(clone_argv(name, port, serve_pid=serve_pid), name, port, src=src)
        (runs if src is None else base_runs[str(src)]).append(run)
        if "failed" in run:
            stop_all([name])
            continue
        run.update(exec_durations(name))
        if serve_pid:
            time.sleep(1.5)  # the server publishes its metrics about once a second
            client = server_clients(serve_pid).get(run["owner_pid"], {})
            run["uffd"] = {k: client.get(k) for k in ("faults", "bytes_copied", "zero_bytes", "prefetch",
                                                      "prefetch_bytes", "prefetch_seconds")}
        log(f"{name}: returned {run['returned']:.2f} s, exec-ready {run['exec']:.2f} s, page {run['page']:.2f} s, "
            f"host to cont {run.get('host_to_cont', 0) * 1000:.0f} ms")
        stop_all([name])  # before the next: idle clones would load the 2 cores
    return runs, base_runs


def traced_clone(name: str, port: int, work: Path) -> dict[str, float]:
    """Where the host-side time to `cont` goes, for one File clone: `perf record` of the scheduler's process
    tracepoints (fork, exec, exit; system-wide, no ptrace, so nothing is slowed) gives every process the clone's
    start runs, the supervisor's own stages the rest. Milliseconds since the launch, by event."""
    data = work / "perf.data"
    recorder = subprocess.Popen(["perf", "record", "-q", "-k", "monotonic", "-a", "-o", str(data),
                                 "-e", "sched:sched_process_fork", "-e", "sched:sched_process_exec",
                                 "-e", "sched:sched_process_exit"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # perf is recording
    wall_offset = time.time() - time.monotonic()
    start = time.monotonic()
    launched = subprocess.Popen([sys.executable, "-m", "fcvm", *clone_argv(name, port, serve_pid=None)],
                                stdout=subprocess.DEVNULL)
    launched.wait(timeout=300)
    recorder.send_signal(signal.SIGINT)
    recorder.wait(timeout=60)
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,time,event,trace"], capture_output=True,
                            text=True, check=True).stdout
    timings = inspect(name)["config"]["timings"]
    tree = {launched.pid}
    events: list[tuple[float, int, str, str]] = []  # (time, pid, event, filename or child pid)
    for line in script.splitlines():
        head, _, trace = line.partition(": sched:")
        fields = head.split()
        if len(fields) != 2:
            continue
        pid, ts = int(fields[0]), float(fields[1])
        event, _, args = trace.partition(": ")
        values = dict(kv.split("=", 1) for kv in args.split() if "=" in kv)
        if event == "sched_process_fork" and pid in tree:
            tree.add(int(values["child_pid"]))
        elif pid in tree and event in ("sched_process_exec", "sched_process_exit"):
            events.append((ts, pid, event, values.get("filename", "")))
    execs = [(ts, pid, filename) for ts, pid, event, filename in events if event == "sched_process_exec"]
    pythons = [(ts, pid) for ts, pid, filename in execs if "/python" in filename]
    qemu_exec = next(ts for ts, _, filename in execs if "qemu-system" in filename)
    marks = {"main": pythons[0][0], "child": pythons[1][0], "t0": timings["t0_wall"] - wall_offset}
    # `snapshot run`, the supervisor, then (before fcvm configured the netns from a thread of the supervisor) the
    # netns setup under nsenter
    inside_pythons = [(ts, pid) for ts, pid in pythons[2:] if ts < qemu_exec]
    network_end = inside_pythons[0][0] if inside_pythons else qemu_exec
    host_iptables = [ts for ts, _, filename in execs if "/iptables" in filename and ts < network_end]
    marks["iptables_first"] = host_iptables[0]
    if inside_pythons:
        inside_start, inside = inside_pythons[0]
        marks["inside_start"] = inside_start
        marks["inside_end"] = next(ts for ts, pid, event, _ in events
                                   if pid == inside and event == "sched_process_exit")
    marks.update(qemu_exec=qemu_exec, loaded=timings["t0_wall"] + timings["loaded"] - wall_offset,
                 resumed=timings["t0_wall"] + timings["resumed"] - wall_offset)
    result = {k: (v - start) * 1000 for k, v in marks.items()}
    result["iptables_host"] = len(host_iptables)
    result["iptables_all"] = sum(1 for ts, _, filename in execs if "/iptables" in filename and ts < qemu_exec)
    result["processes"] = sum(1 for ts, _, _ in execs if ts <= marks["resumed"])
    data.unlink()
    return result


def parallel(label: str, count: int, serve_pid: int | None, *, src: Path | None = None) -> dict[str, Any]:
    names = [f"{label}{i}" for i in range(count)]
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    log(f"{count} {label} clones at once")
    with ThreadPoolExecutor(count) as pool:
        runs = list(pool.map(lambda np: launch(clone_argv(np[0], np[1], serve_pid=serve_pid), np[0], np[1],
                                               run_exec=False, src=src), zip(names, ports, strict=True)))
    served = [r for r in runs if "failed" not in r]
    wall = max(r["page"] for r in served)
    log(f"{len(served)} of {count} serve their page after {wall:.2f} s")
    return {"all_names": names, "names": [r["name"] for r in served], "runs": runs, "wall_all_pages": wall,
            "wall_all_returned": max(r["returned"] for r in served), "load": load(),
            "failed": [r["failed"] for r in runs if "failed" in r]}


def memory(names: list[str], steps: list[tuple[str, str]]) -> dict[str, Any]:
    """RSS/PSS of each clone's QEMU after each step (a command run in every clone's VM, one clone at a time)."""
    pids = {n: vmm_pid(n) for n in names}
    out: dict[str, Any] = {}
    for step, command in [("started", ""), *steps]:
        if command:
            for n in names:
                fcvm("exec", n, "--vm", "--", "sh", "-c", command)
        out[step] = {n: rollup(pid) for n, pid in pids.items()}
        total = sum(r["Pss"] for r in out[step].values())
        log(f"memory after {step}: total PSS {total / MiB:.0f} MiB")
    return out


# --- report ---------------------------------------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> None:
    anchor = results["anchor"]
    print(f"\nload average during the run: {min(results['loads']):.2f}-{max(results['loads']):.2f} (1 min, 2 cores)")
    print(f"anchor, cold boot (`fcvm podman run -d {IMAGE}`): returned {anchor['returned']:.2f} s, "
          f"exec-ready {anchor['exec']:.2f} s, page {anchor['page']:.2f} s; on the running VM one "
          f"`fcvm exec -- true` takes {anchor['exec_container_s']:.2f} s, `--vm` {anchor['exec_vm_s']:.2f} s")

    idle = [p["pause_s"] for p in results["pause_idle"]]
    print(f"\nsnapshot create, 1 GiB guest: pause (stop -> cont) idle guest median {statistics.median(idle):.3f} s "
          f"({', '.join(f'{p:.3f}' for p in idle)}), after {WORKING_SET_MIB + COLD_MIB} MiB written "
          f"{results['pause_dirty']['pause_s']:.3f} s; the command {results['pause_dirty']['command_s']:.2f} s")

    all_series = [(f"File, {src}", runs) for src, runs in results.get("file_seq_base", {}).items()]
    all_series += [(label, results[key]) for label, key in (("File", "file_seq"), ("Uffd, prefetch on", "uffd_seq"),
                                                            ("Uffd, prefetch off", "uffd_seq_off")) if key in results]
    series = [(label, [r for r in runs if "failed" not in r]) for label, runs in all_series]
    for _, runs in all_series:
        for run in runs:
            if "failed" in run:
                print(f"FAILED to start: {run['name']}: {run['failed']}")
    n = max((len(runs) for _, runs in series), default=0)
    print(f"\nclone spawn, {n} sequential clones each (p50 / p95, seconds; ratio = p50 / the cold boot's):")
    print(f"{'':<22}{'-d returned':>22}{'exec-ready':>22}{'page served':>22}{'host to cont':>16}")
    for label, runs in series:
        if len(label) > 22:
            print(label)
            label = ""
        cells = []
        for key in ("returned", "exec", "page"):
            values = [r[key] for r in runs]
            cells.append(f"{pct(values, .5):5.2f} / {pct(values, .95):5.2f} ({pct(values, .5) / anchor[key]:.3f}x)")
        host = [r["host_to_cont"] * 1000 for r in runs]
        print(f"{label:<22}" + "".join(f"{c:>22}" for c in cells) + f"{pct(host, .5):9.0f} ms p50")
    stages = ("vmm_starting", "loaded", "resumed", "vmm_started", "agent_connected", "restored", "healthy")
    print("\nclone stages (p50, seconds since the supervisor began; + launch -> supervisor began):")
    for label, runs in series:
        gap = statistics.median(r["t0_gap"] for r in runs)
        stage_p50 = "  ".join(f"{s} {statistics.median(r['timings'][s] for r in runs):.3f}" for s in stages
                              if all(s in r["timings"] for r in runs))
        print(f"  {label[-20:]:<20} launch->t0 {gap:.3f}  {stage_p50}")
        container = statistics.median(r["exec_container_s"] for r in runs)
        in_vm = statistics.median(r["exec_vm_s"] for r in runs)
        print(f"  {'':<20} one exec on the running clone: container {container:.2f} s, --vm {in_vm:.2f} s")
    for label, runs in series:
        if not label.startswith("Uffd"):
            continue
        first, rest = runs[0], runs[1:]  # the first of the series records the working set
        print(f"  {label}: first clone page {first['page']:.2f} s exec-ready {first['exec']:.2f} s "
              f"({first['uffd']['prefetch']}, {(first['uffd']['bytes_copied'] or 0) / MiB:.0f} MiB demand-copied); "
              f"later clones p50 page {statistics.median(r['page'] for r in rest):.2f} s exec-ready "
              f"{statistics.median(r['exec'] for r in rest):.2f} s, prefetched "
              f"{statistics.median((r['uffd']['prefetch_bytes'] or 0) for r in rest) / MiB:.0f} MiB, demand-copied "
              f"{statistics.median((r['uffd']['bytes_copied'] or 0) for r in rest) / MiB:.0f} MiB")

    if "trace" in results:
        t = results["trace"]
        steps = [
            ("launch -> `python3 -m fcvm snapshot run` exec'd", 0, t["main"]),
            ("`fcvm snapshot run`: Python start, imports, request; spawns the supervisor", t["main"], t["child"]),
            ("supervisor: Python start and imports until it begins (t0)", t["child"], t["t0"]),
            ("t0 -> first iptables: reap, state row, reflinked disk, pyroute2 import, netns and veth",
             t["t0"], t["iptables_first"]),
        ]
        if "inside_start" in t:
            steps += [
                (f"{t['iptables_host']:.0f} host iptables processes (and the rest of the host side of the network)",
                 t["iptables_first"], t["inside_start"]),
                ("`python3 -m fcvm.network.inside` in the netns (TAP, routes, iptables)", t["inside_start"],
                 t["inside_end"]),
                ("-> QEMU exec'd (through nsenter)", t["inside_end"], t["qemu_exec"]),
            ]
        else:
            steps.append((f"the network from the first iptables process ({t['iptables_all']:.0f} in all), the netns "
                          "side from a thread; QEMU exec'd (through nsenter)", t["iptables_first"], t["qemu_exec"]))
        steps += [
            ("QEMU start, QMP connect, version, capabilities, device state loaded", t["qemu_exec"], t["loaded"]),
            ("`cont`", t["loaded"], t["resumed"]),
        ]
        print(f"\nhost-side time to `cont` of one File clone (`perf record` of process starts; {t['processes']:.0f} "
              f"execs): {t['resumed']:.0f} ms")
        for label, begin, end in steps:
            print(f"  {end - begin:6.0f} ms  {label}")

    for key, label in (("file_par_base", "File (baseline)"), ("file_par", "File"), ("uffd_par", "Uffd")):
        if key not in results:
            continue
        par = results[key]
        print(f"\n{len(par['all_names'])} {label} clones started at once: {len(par['names'])} serve their page after "
              f"{par['wall_all_pages']:.2f} s (all `-d` returned after {par['wall_all_returned']:.2f} s); "
              f"{par['wall_all_pages'] / anchor['page']:.3f}x one cold boot to its page")
        for failure in par["failed"]:
            print(f"  FAILED to start (not in the wall time): {failure}")

    if "file_mem" not in results and "uffd_mem" not in results:
        return
    source_rss = results["source_memory"]["Rss"]
    print(f"\nmemory: the source's QEMU RSS {source_rss / MiB:.0f} MiB after it read its working set")
    for key, label in (("file_mem", "File"), ("uffd_mem", "Uffd")):
        if key not in results:
            continue
        mem = results[key]
        for step, per_clone in mem.items():
            if step == "server":
                continue
            count = len(per_clone)
            pss = sum(r["Pss"] for r in per_clone.values())
            rss = statistics.median(r["Rss"] for r in per_clone.values())
            anon = statistics.median(r.get("Pss_Anon", 0) for r in per_clone.values())
            ratio = pss / (count * source_rss)
            print(f"  {count} {label} clones, {step:<22} sum PSS {pss / MiB:6.0f} MiB = {ratio:.3f}"
                  f" x ({count} x source RSS); RSS each {rss / MiB:.0f} MiB, anonymous PSS each {anon / MiB:.0f} MiB")
    if "server" in results.get("uffd_mem", {}):
        server = results["uffd_mem"]["server"]
        print(f"  the page server: RSS {server['Rss'] / MiB:.0f} MiB, PSS {server['Pss'] / MiB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--parallel", type=int, help="clones started at once (default: --clones)")
    parser.add_argument("--pause-runs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/fcvm/bench-clone"))
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"which phases after the anchor and the snapshot, of {','.join(PHASES)}")
    parser.add_argument("--baseline-src", type=Path, action="append", default=[],
                        help="another checkout's src/, run alternately with this one's (repeatable)")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if not phases <= set(PHASES):
        raise SystemExit(f"--phases: unknown {', '.join(sorted(phases - set(PHASES)))}")
    baselines = [b.resolve() for b in args.baseline_src]
    at_once = args.parallel or args.clones
    if args.data_dir.exists():
        raise SystemExit(f"{args.data_dir} exists (an earlier run?): remove it first")
    os.environ["FCVM_ASSETS_DIR"] = str(paths.assets_dir())  # share the built assets; before DATA_DIR moves
    os.environ["FCVM_DATA_DIR"] = str(args.data_dir)
    os.environ.pop("FCVM_LOG", None)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "loads": []}
    sampler_stop = threading.Event()

    def sample_load() -> None:
        while not sampler_stop.wait(5):
            results["loads"].append(load())

    threading.Thread(target=sample_load, daemon=True).start()
    try:
        phase_source(results, args.pause_runs)
        if "file" in phases:
            log("sequential File clones" + "".join(f", in turn with {b}" for b in baselines))
            results["file_seq"], results["file_seq_base"] = sequential("file", args.clones, None, baselines=baselines)
        if "trace" in phases and shutil.which("perf"):
            log("one File clone under `perf record`: where the host-side time goes")
            results["trace"] = traced_clone("traced", free_port(), args.data_dir)
            stop_all(["traced"])
        if "uffd" in phases:
            log("sequential Uffd clones, prefetch on (the first records the working set)")
            with page_server("on") as serve_pid:
                results["uffd_seq"], _ = sequential("uffd", args.clones, serve_pid)
                if "par" in phases:
                    par = results["uffd_par"] = parallel("upar", at_once, serve_pid)
                    if "mem" in phases:
                        mem = results["uffd_mem"] = memory(par["names"], [
                            ("read the working set", "dd if=/root/ws of=/dev/null bs=1M status=none")])
                        mem["server"] = rollup(serve_pid)
                    stop_all(par["all_names"])
            log("sequential Uffd clones, prefetch off")
            with page_server("off") as serve_pid:
                results["uffd_seq_off"], _ = sequential("uoff", args.clones, serve_pid)
        if "par" in phases:
            if baselines:
                par = results["file_par_base"] = parallel("bpar", at_once, None, src=baselines[0])
                stop_all(par["all_names"])
            par = results["file_par"] = parallel("fpar", at_once, None)
            if "mem" in phases:
                results["file_mem"] = memory(par["names"], [
                    ("read the working set", "dd if=/root/ws of=/dev/null bs=1M status=none"),
                    ("+ read an uncached file", "dd if=/root/cold of=/dev/null bs=1M status=none")])
            stop_all(par["all_names"])
    finally:
        sampler_stop.set()
        cleanup()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    summarize(results)


def cleanup() -> None:
    """Stop whatever is left, remove the snapshots, then the data dir."""
    rows = json.loads(fcvm("ls", "-a", "--json", check=False).stdout or "[]")
    stop_all([r["name"] for r in rows])
    for snap in snapshots()["snapshots"]:
        fcvm("snapshot", "rm", "-f", snap["name"], check=False)
    fcvm("gc", check=False)
    shutil.rmtree(paths.data_dir(), ignore_errors=True)


if __name__ == "__main__":
    main()
