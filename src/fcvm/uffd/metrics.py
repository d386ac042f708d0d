"""Per-client page-server metrics: counters and a log-linear latency histogram (4 buckets per octave)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

_SUB = 4  # buckets per power of two: about 19 % resolution


def _bucket(ns: int) -> int:
    if ns < 8:
        return max(ns, 0)
    bits = ns.bit_length()
    return 8 + (bits - 4) * _SUB + (ns >> (bits - 3)) - 4


def _upper(index: int) -> int:
    """Exclusive upper bound (ns) of bucket `index`."""
    if index < 8:
        return index + 1
    octave, sub = divmod(index - 8, _SUB)
    return (5 + sub) << (octave + 1)


class Histogram:
    """Latencies in nanoseconds; percentiles are bucket upper bounds (never under-reported)."""

    __slots__ = ("count", "counts", "max_ns", "total_ns")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0

    def add(self, ns: int) -> None:
        b = _bucket(ns)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns


    def percentile(self, q: float) -> int:
        """Upper bound (ns) of the bucket holding the q-quantile, 0 < q <= 1; 0 when empty."""
        if not self.count:
            return 0
        rank = max(1, int(q * self.count + 0.999999))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(_upper(b), self.max_ns)
        return self.max_ns

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_us": round(self.total_ns / self.count / 1000, 2) if self.count else 0,
            "p50_us": round(self.percentile(0.5) / 1000, 2),
            "p90_us": round(self.percentile(0.9) / 1000, 2),
            "p99_us": round(self.percentile(0.99) / 1000, 2),
            "max_us": round(self.max_ns / 1000, 2),
            "buckets_us": {f"{_upper(b) / 1000:g}": n for b, n in sorted(self.counts.items())},
        }


@dataclass
class ClientMetrics:
    client: str
    pid: int
    uid: int
    gid: int
    connected: float = field(default_factory=time.time)
    ended: float | None = None
    state: str = "serving"  # serving | exited | error
    memory_bytes: int = 0
    regions: int = 0
    faults: int = 0  # demand faults answered (copy or zero page)
    bytes_copied: int = 0  # demand bytes filled from the memory file
    zero_faults: int = 0  # demand faults answered with zero pages: holes of the memory file, removed ranges
    zero_bytes: int = 0
    hole_bytes: int = 0  # memory lying in holes of the memory file (served as zero pages, never copied)
    eexist: int = 0
    eagain: int = 0
    removes: int = 0
    removed_bytes: int = 0
    errors: int = 0
    last_error: str = ""
    prefetch: str = "off"  # off | recording | recorded | running | done | cancelled
    prefetch_bytes: int = 0
    prefetch_batches: int = 0
    prefetch_seconds: float = 0.0
    latency: Histogram = field(default_factory=Histogram)

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "latency"}
        data["latency"] = self.latency.to_json()
        if self.prefetch_seconds > 0:
            data["prefetch_mb_s"] = round(self.prefetch_bytes / self.prefetch_seconds / 1e6, 1)
        return data
