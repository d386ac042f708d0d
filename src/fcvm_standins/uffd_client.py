"""`fcvm-uffd-client`: a faithful stand-in for Firecracker's side of the UFFD handshake.

It maps anonymous "guest memory" of the memory file's size (one region, or two with an x86-style gap
between them; base pages, or hugetlbfs pages with --page-size 2M like Firecracker's huge_pages "2M"),
creates a userfaultfd with UFFDIO_API(EVENT_REMOVE) and registers every region MISSING, connects to the
server and sends the JSON regions plus the uffd in one sendmsg, keeps the socket and the uffd open (as
Firecracker does), then touches pages from several threads and verifies every touched page byte for
byte against the memory file. It can madvise(DONTNEED) ranges to produce REMOVE events and check that
they then read as zero.

`--backend file` maps the memory file MAP_PRIVATE instead (Firecracker's File backend): the kernel
baseline, touched and verified by exactly the same code.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import mmap
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcvm.uffd import ioctls, memory, workingset
from fcvm.uffd.handshake import Region

PAGE = 4096
GIB = 1 << 30
VERIFY_CHUNK = 16 << 20
EXIT_MISMATCH = 1
EXIT_STALLED = 3


@dataclass
class Options:
    mem_file: Path
    socket: Path | None = None
    backend: str = "uffd"  # uffd | file
    regions: int = 1
    page_size: int = PAGE  # > PAGE: MAP_HUGETLB regions of that page size (needs reserved huge pages)
    split: int | None = None  # size of the first region when regions == 2
    gap: int = GIB
    pattern: str = "sequential"  # sequential | random | working-set | none
    fraction: float = 1.0
    working_set: Path | None = None
    threads: int = 4
    seed: int = 1
    verify: bool = True
    latency: bool = True
    remove: list[tuple[int, int]] = field(default_factory=list)  # file ranges to madvise(DONTNEED)
    touch_range: list[tuple[int, int]] = field(default_factory=list)  # file ranges touched first
    remove_when: str = "after"  # before | during | after
    delay: float = 0.0  # sleep after the handshake before touching (lets a prefetch run)
    hold: float = 0.0  # after the report, keep the memory mapped this long (-1: until a signal)
    sigterm_touch: int = 0  # on SIGTERM, touch and verify this many untouched pages first
    stall_timeout: float = 30.0
    pieces: int = 1  # send the handshake JSON in this many pieces (robustness tests)
    touch: str = "read"  # read | write (writes each page's own first byte back: a write fault, same content)


def layout(mem_size: int, count: int, split: int | None, page_size: int = PAGE) -> list[tuple[int, int]]:
    """(file offset, size) per region. Two regions split the file like x86 splits RAM around 3 GiB."""
    if count == 1:
        return [(0, mem_size)]
    if count != 2:
        raise ValueError("--regions must be 1 or 2")
    first = split if split is not None else (3 * GIB if mem_size > 3 * GIB else mem_size // 2)
    first -= first % page_size
    if not 0 < first < mem_size:
        raise ValueError(f"--split {first} must fall inside the memory file")
    return [(0, first), (first, mem_size - first)]


class GuestMemory:
    """The regions, mapped at real addresses inside one reservation (the gap stays PROT_NONE)."""

    def __init__(self, opts: Options, mem_size: int) -> None:
        self.mem_size = mem_size
        ps = opts.page_size
        parts = layout(mem_size, opts.regions, opts.split, ps)
        gap = opts.gap if len(parts) == 2 else 0
        if gap % ps:
            raise ValueError(f"--gap must be a multiple of the page size {ps}")
        # hugetlb mappings must start on a huge-page boundary: reserve one page more and align up
        self.reserved = mem_size + gap + (ps if ps > PAGE else 0)
        self.reservation = memory.map_memory(
            self.reserved, memory.PROT_NONE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | memory.MAP_NORESERVE,
        )
        self.base = -(-self.reservation // ps) * ps
        self.regions: list[Region] = []
        fd = os.open(opts.mem_file, os.O_RDONLY) if opts.backend == "file" else -1
        try:
            addr = self.base
            for offset, size in parts:
                rw = mmap.PROT_READ | mmap.PROT_WRITE
                if fd >= 0:
                    memory.map_memory(size, rw, mmap.MAP_PRIVATE | memory.MAP_FIXED, fd, offset, addr)
                elif ps > PAGE:
                    # reserved at mmap time (no MAP_NORESERVE): too few huge pages fail here, not as SIGBUS
                    flags = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | memory.MAP_FIXED | memory.MAP_HUGETLB
                             | (ps.bit_length() - 1) << memory.MAP_HUGE_SHIFT)
                    memory.map_memory(size, rw, flags, -1, 0, addr)
                else:
                    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | memory.MAP_NORESERVE | memory.MAP_FIXED
                    memory.map_memory(size, rw, flags, -1, 0, addr)
                self.regions.append(Region(addr, size, offset, ps))
                addr += size + gap
        finally:
            if fd >= 0:
                os.close(fd)

    def addr_of(self, file_offset: int) -> int:
        for r in self.regions:
            if r.offset <= file_offset < r.offset + r.size:
                return r.base + file_offset - r.offset
        raise ValueError(f"file offset {file_offset} outside the regions")

    def close(self) -> None:
        memory.unmap(self.reservation, self.reserved)


def handshake_json(regions: list[Region]) -> bytes:
    """Exactly what Firecracker sends: both page sizes in bytes."""
    return json.dumps([
        {"base_host_virt_addr": r.base, "size": r.size, "offset": r.offset,
         "page_size_kib": r.page_size, "page_size": r.page_size}
        for r in regions
    ]).encode()


def send_handshake(path: Path | str, payload: bytes, fds: list[int], *, pieces: int = 1) -> socket.socket:
    """Connect and send the JSON plus fds in one sendmsg (as Firecracker does); the socket stays open.

    `pieces` > 1 splits the JSON over several sends (fds with the first) to prove that the server
    frames the JSON itself instead of relying on one read or on EOF.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    step = -(-len(payload) // max(1, pieces)) if payload else 0
    chunks = [payload[i : i + step] for i in range(0, len(payload), step)] if step else [b""]
    for k, chunk in enumerate(chunks):
        if k:
            time.sleep(0.05)
        sock.sendmsg([chunk], ancillary if k == 0 else [])
    return sock


def pages_for(opts: Options, mem_size: int) -> list[int]:
    """File page indices to touch, in order: --touch-range pages first, then the pattern's."""
    first = [p for off, n in opts.touch_range for p in range(off // PAGE, -(-(off + n) // PAGE))]
    return first + _pattern_pages(opts, mem_size)


def _pattern_pages(opts: Options, mem_size: int) -> list[int]:
    total = mem_size // PAGE
    if opts.pattern == "none":
        return []
    if opts.pattern == "sequential":
        return list(range(int(total * opts.fraction)))
    if opts.pattern == "random":
        rng = random.Random(opts.seed)
        pages = list(range(total))
        rng.shuffle(pages)
        return pages[: int(total * opts.fraction)]
    if opts.pattern == "working-set":
        path = opts.working_set or workingset.path_for_mem_file(opts.mem_file)
        runs = workingset.load(path, opts.mem_file)
        if runs is None:
            raise SystemExit(f"fcvm-uffd-client: no usable working set at {path}")
        return [p for off, n in runs for p in range(off // PAGE, (off + n) // PAGE)]
    raise ValueError(f"unknown pattern {opts.pattern!r}")


def anonymous_bytes(pid: int, region: dict[str, int]) -> int:
    """`Anonymous` bytes of a client's guest-memory mapping alone, from /proc/PID/smaps: private pages the
    server copied in (zero-page mappings count 0)."""
    lo = region["base_host_virt_addr"]
    hi = lo + region["size"]
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and lo < end
        elif inside and line.startswith("Anonymous:"):
            total += int(line.split()[1]) * 1024
    return total


def percentiles(values: array.array, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{round(q * 100)}_us": round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 2)
           for q in qs}
    out["max_us"] = round(ordered[-1] / 1000, 2)
    out["mean_us"] = round(sum(ordered) / len(ordered) / 1000, 3)
    return out


class Toucher:
    """Reads one byte of each page through ctypes.memmove: C speed, GIL released during the access,
    so a fault blocks only its own thread (as a vCPU thread would block).

    With `values` (one byte per address), it writes that byte instead: the first access is a write
    fault (copy-on-write for the File backend), and the content stays what the memory file holds.
    """

    def __init__(self, threads: int, latency: bool, values: bytes | None = None) -> None:
        self.threads = max(1, threads)
        self.latency = latency
        self.values = values
        self.progress = [0] * self.threads
        self.latencies: list[array.array] = [array.array("Q") for _ in range(self.threads)]

    def run(self, addrs: array.array) -> float:
        """Touch every address; returns the wall time in seconds."""
        chunk = -(-len(addrs) // self.threads) if len(addrs) else 0
        workers = [
            threading.Thread(
                target=self._work,
                args=(i, addrs[i * chunk : (i + 1) * chunk],
                      self.values[i * chunk : (i + 1) * chunk] if self.values is not None else None),
                daemon=True,
            )
            for i in range(self.threads)
        ]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    def _work(self, index: int, addrs: array.array, values: bytes | None) -> None:
        move = ctypes.memmove
        sink = ctypes.create_string_buffer(8)
        dst = ctypes.addressof(sink)
        progress = self.progress
        if values is not None:
            fill = ctypes.memset
            clock = time.perf_counter_ns
            lat = self.latencies[index]
            for k, addr in enumerate(addrs):
                t0 = clock()
                fill(addr, values[k], 1)
                lat.append(clock() - t0)
                if not k & 63:
                    progress[index] = k
        elif self.latency:
            clock = time.perf_counter_ns
            lat = self.latencies[index]
            append = lat.append
            for k, addr in enumerate(addrs):
                t0 = clock()
                move(dst, addr, 1)
                append(clock() - t0)
                if not k & 63:
                    progress[index] = k
        else:
            for k, addr in enumerate(addrs):
                move(dst, addr, 1)
                if not k & 63:
                    progress[index] = k
        progress[index] = len(addrs)


class Harness:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.mem_size = opts.mem_file.stat().st_size
        ps = opts.page_size
        if ps < PAGE or ps & (ps - 1):
            raise SystemExit("fcvm-uffd-client: --page-size must be a power of two >= 4096")
        if ps > PAGE and opts.backend != "uffd":
            raise SystemExit("fcvm-uffd-client: huge pages need --backend uffd (a file mapping cannot be hugetlb)")
        if self.mem_size % ps:
            raise SystemExit(f"fcvm-uffd-client: the memory file's size must be a multiple of {ps}")
        self.report: dict[str, Any] = {
            "pid": os.getpid(), "backend": opts.backend, "pattern": opts.pattern, "threads": opts.threads,
            "mem_size": self.mem_size, "stalled": False, "ok": False,
        }
        self.mem = GuestMemory(opts, self.mem_size)
        self.report["regions"] = [r.to_json() for r in self.mem.regions]
        self.uffd = -1
        self.sock: socket.socket | None = None
        self.toucher = Toucher(opts.threads, opts.latency)
        self.touched: set[int] = set()
        self.removed: list[tuple[int, int]] = []
        self._file = os.open(opts.mem_file, os.O_RDONLY | os.O_CLOEXEC)
        self._stall_stop = threading.Event()

    # --- setup ------------------------------------------------------------------------------------

    def connect(self) -> None:
        if self.opts.backend != "uffd":
            return
        if self.opts.socket is None:
            raise SystemExit("fcvm-uffd-client: --socket is required with --backend uffd")
        t0 = time.perf_counter()
        self.uffd = ioctls.create(nonblock=True)
        ioctls.api(self.uffd, ioctls.UFFD_FEATURE_EVENT_REMOVE)
        for r in self.mem.regions:
            ioctls.register(self.uffd, r.base, r.size, ioctls.UFFDIO_REGISTER_MODE_MISSING)
        self.sock = send_handshake(
            self.opts.socket, handshake_json(self.mem.regions), [self.uffd], pieces=self.opts.pieces
        )
        self.report["handshake_ms"] = round((time.perf_counter() - t0) * 1000, 3)

    # --- touching ---------------------------------------------------------------------------------

    def touch(self, pages: list[int]) -> None:
        addrs = array.array("Q", (self.mem.addr_of(p * PAGE) for p in pages))
        if self.opts.touch == "write":
            with open(self.opts.mem_file, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
                first = data[::PAGE]  # the first byte of every page
            self.toucher.values = bytes(first[p] for p in pages)
        remover: threading.Thread | None = None
        if self.opts.remove and self.opts.remove_when == "during":
            remover = threading.Thread(target=self._remove_after_progress, daemon=True)
            remover.start()
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        watchdog.start()
        started = time.time()
        seconds = self.toucher.run(addrs)
        self._stall_stop.set()
        if remover is not None:
            remover.join()
        self.touched.update(pages)
        lat = array.array("Q")
        for part in self.toucher.latencies:
            lat.extend(part)
        self.report.update({
            "pages_touched": len(pages),
            "bytes_touched": len(pages) * PAGE,
            "touch_seconds": round(seconds, 6),
            "touch_start": started,
            "touch_end": started + seconds,
            "mb_s": round(len(pages) * PAGE / seconds / 1e6, 1) if seconds > 0 else None,
            "touch_latency": percentiles(lat),
        })

    def _remove_after_progress(self) -> None:
        while sum(self.toucher.progress) < 64 and not self._stall_stop.is_set():
            time.sleep(0.0005)
        self.remove()

    def _watchdog(self) -> None:
        last = -1
        last_change = time.monotonic()
        while not self._stall_stop.wait(0.05):
            now_progress = sum(self.toucher.progress)
            if now_progress != last:
                last, last_change = now_progress, time.monotonic()
            elif time.monotonic() - last_change > self.opts.stall_timeout:
                self.stalled(f"no page touched for {self.opts.stall_timeout:g} s ({now_progress} done)")

    def stalled(self, why: str) -> None:
        """The server stopped answering: report and exit (threads stuck in faults die with us)."""
        self.report.update(stalled=True, stall=why, ok=False)
        self.emit()
        os._exit(EXIT_STALLED)

    def remove(self) -> None:
        for offset, length in self.opts.remove:
            addr = self.mem.addr_of(offset)
            memory.advise(addr, length, memory.MADV_DONTNEED)
            self.removed.append((offset, length))
        self.report["removed"] = [{"offset": o, "length": n} for o, n in self.removed]

    # --- verification -----------------------------------------------------------------------------

    def _expected_zero(self, page: int) -> bool:
        off = page * PAGE
        return any(o <= off < o + n for o, n in self.removed)

    def verify(self, pages: set[int]) -> dict[str, Any]:
        """Compare each page with the memory file (or with zeros inside removed ranges)."""
        mismatches: list[dict[str, Any]] = []
        count = 0
        zero_pages = 0
        zeros = bytes(VERIFY_CHUNK)
        for lo, hi in _runs(sorted(pages)):
            pos = lo
            while pos < hi:
                end = min(hi, pos + VERIFY_CHUNK // PAGE)
                # split the chunk at removed-range and region boundaries
                end = self._cut(pos, end)
                n = (end - pos) * PAGE
                got = ctypes.string_at(self.mem.addr_of(pos * PAGE), n)
                if self._expected_zero(pos):
                    want = zeros[:n]
                    zero_pages += end - pos
                else:
                    want = os.pread(self._file, n, pos * PAGE)
                if got != want:
                    for k in range(end - pos):
                        a, b = got[k * PAGE : (k + 1) * PAGE], want[k * PAGE : (k + 1) * PAGE]
                        if a != b:
                            if len(mismatches) < 10:
                                mismatches.append({
                                    "page": pos + k,
                                    "expected": "zero" if self._expected_zero(pos) else "file",
                                    "got_zero": not any(a),
                                })
                            else:
                                mismatches.append({})
                count += end - pos
                pos = end
        return {"pages": count, "zero_pages": zero_pages, "mismatches": len(mismatches),
                "first_mismatches": [m for m in mismatches if m][:10], "ok": not mismatches}

    def _cut(self, lo: int, hi: int) -> int:
        off_lo, off_hi = lo * PAGE, hi * PAGE
        bounds = [o for o, n in self.removed for o in (o, o + n)]
        bounds += [r.offset + r.size for r in self.mem.regions]
        for b in bounds:
            if off_lo < b < off_hi:
                off_hi = b
        return off_hi // PAGE

    # --- signals and output -----------------------------------------------------------------------

    def on_sigterm(self, _signum: int, _frame: Any) -> None:
        """As a VM being stopped: prove the server still serves, then exit."""
        info: dict[str, Any] = {"t": time.time()}
        untouched = [p for p in range(self.mem_size // PAGE) if p not in self.touched]
        sample = untouched[: self.opts.sigterm_touch]
        if sample:
            self._stall_stop.clear()
            self.toucher = Toucher(1, False)
            watchdog = threading.Thread(target=self._watchdog, daemon=True)
            watchdog.start()
            self.toucher.run(array.array("Q", (self.mem.addr_of(p * PAGE) for p in sample)))
            self._stall_stop.set()
            check = self.verify(set(sample))
            info.update(pages=len(sample), ok=check["ok"], mismatches=check["mismatches"])
        info["done"] = time.time()
        self.report["sigterm"] = info
        self.emit()
        os._exit(0 if info.get("ok", True) else EXIT_MISMATCH)

    def emit(self) -> None:
        line = json.dumps(self.report)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.uffd >= 0:
            os.close(self.uffd)
        self.mem.close()
        os.close(self._file)


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def run(opts: Options) -> int:
    harness = Harness(opts)
    signal.signal(signal.SIGTERM, harness.on_sigterm)
    harness.connect()
    pages = pages_for(opts, harness.mem_size)
    if opts.delay:
        time.sleep(opts.delay)
    if opts.remove and opts.remove_when == "before":
        harness.remove()
    harness.touch(pages)
    if opts.remove and opts.remove_when == "after":
        harness.remove()
    check_pages = set(harness.touched)
    for offset, length in harness.removed:
        check_pages.update(range(offset // PAGE, (offset + length) // PAGE))
    if opts.verify:
        t0 = time.perf_counter()
        result = harness.verify(check_pages)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        harness.report["verify"] = result
        harness.report["ok"] = result["ok"]
    else:
        harness.report["ok"] = True
    harness.emit()
    if opts.hold:
        deadline = None if opts.hold < 0 else time.monotonic() + opts.hold
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.05)
    code = 0 if harness.report["ok"] else EXIT_MISMATCH
    harness.close()
    return code


def _size(text: str) -> int:
    from fcvm.uffd.server import parse_size

    return parse_size(text)


def _range(text: str) -> tuple[int, int]:
    offset, _, length = text.partition(":")
    return _size(offset), _size(length)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcvm-uffd-client", description=__doc__.split("\n")[0])
    p.add_argument("--mem-file", required=True, type=Path)
    p.add_argument("--socket", type=Path, help="the server's Unix socket (uffd backend)")
    p.add_argument("--backend", choices=["uffd", "file"], default="uffd")
    p.add_argument("--regions", type=int, choices=[1, 2], default=1)
    p.add_argument("--page-size", type=_size, default=PAGE,
                   help="guest page size; above 4K, hugetlbfs pages (e.g. 2M; needs vm.nr_hugepages)")
    p.add_argument("--split", type=_size, help="size of the first region (default: 3G, or half)")
    p.add_argument("--gap", type=_size, default=GIB, help="hole between the regions (default 1G)")
    p.add_argument("--pattern", choices=["sequential", "random", "working-set", "none"], default="sequential")
    p.add_argument("--fraction", type=float, default=1.0, help="share of pages to touch (0..1)")
    p.add_argument("--working-set", type=Path, help="working-set file (default: next to the memory file)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--no-latency", dest="latency", action="store_false")
    p.add_argument("--remove", action="append", type=_range, default=[], metavar="OFFSET:LENGTH",
                   help="madvise(DONTNEED) this file range (e.g. 64M:8M); repeatable")
    p.add_argument("--touch-range", action="append", type=_range, default=[], metavar="OFFSET:LENGTH",
                   help="touch this file range first (e.g. around a region boundary); repeatable")
    p.add_argument("--remove-when", choices=["before", "during", "after"], default="after")
    p.add_argument("--delay", type=float, default=0.0, help="seconds between handshake and touching")
    p.add_argument("--hold", type=float, default=0.0, help="keep running this long after the report (-1: forever)")
    p.add_argument("--sigterm-touch", type=int, default=0, metavar="N",
                   help="on SIGTERM, touch and verify N untouched pages before exiting")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="report a stall and exit 3 when no page was touched for this long")
    p.add_argument("--pieces", type=int, default=1, help="send the handshake JSON in N pieces")
    p.add_argument("--touch", choices=["read", "write"], default="read",
                   help="read a byte of each page, or write its own first byte back (a write fault)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = Options(**{k: v for k, v in vars(args).items()})
    try:
        return run(opts)
    except (OSError, ValueError) as exc:
        print(f"fcvm-uffd-client: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
