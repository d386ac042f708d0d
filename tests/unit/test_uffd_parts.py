"""UFFD server pieces that need no kernel: handshake framing and validation (fuzzed), metrics,
working-set files, hole maps and fault windows over holes, and `fcvm snapshot ls`."""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcvm.commands import snapshot_ls, snapshot_serve
from fcvm.core.errors import FcvmError
from fcvm.core.proc import ProcessRef
from fcvm.state.store import Store
from fcvm.uffd import holes, ioctls, workingset
from fcvm.uffd.handshake import MAX_HANDSHAKE, HandshakeError, JsonFramer, Region, parse_regions
from fcvm.uffd.metrics import ClientMetrics, Histogram
from fcvm.uffd.server import HOLE, MISSING, Client, ServeConfig, Server, _segments_for, parse_size

MiB = 1 << 20
KiB = 1 << 10
PAGE = 4096


def region(base: int, size: int, offset: int, page: int = 4096) -> dict[str, int]:
    return {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": page, "page_size_kib": page}


def frame(data: bytes) -> bytes | None:
    return JsonFramer().feed(data)


# --- framing ---------------------------------------------------------------------------------------


def test_framer_waits_for_the_closing_bracket_not_for_eof() -> None:
    payload = json.dumps([region(0x1000_0000, 8 * MiB, 0)]).encode()
    framer = JsonFramer()
    for i in range(len(payload) - 1):
        assert framer.feed(payload[i : i + 1]) is None
    assert framer.feed(payload[-1:]) == payload


def test_framer_ignores_brackets_inside_strings() -> None:
    payload = b'[{"k": "]\\"]["}]'
    assert frame(payload[:-1]) is None
    assert frame(payload) == payload


@pytest.mark.parametrize("data", [b"{}", b"x[", b'"[]"', b"[1] 2"])
def test_framer_rejects_non_arrays_and_trailing_bytes(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        frame(data)


def test_framer_bounds_the_handshake() -> None:
    with pytest.raises(HandshakeError, match="longer than"):
        frame(b"[" + b" " * MAX_HANDSHAKE)


# --- validation ------------------------------------------------------------------------------------


def test_x86_style_two_regions_with_a_gap() -> None:
    regs = [region(0x7F00_0000_0000 + 4 * MiB, 4 * MiB, 2 * MiB), region(0x7F00_0000_0000, 2 * MiB, 0)]
    parsed = parse_regions(json.dumps(regs).encode(), 6 * MiB)
    assert parsed == [
        Region(0x7F00_0000_0000, 2 * MiB, 0, 4096), Region(0x7F00_0000_0000 + 4 * MiB, 4 * MiB, 2 * MiB, 4096)
    ]


def test_only_one_page_size_field_is_enough() -> None:
    entry = region(0x10000, 4096, 0)
    del entry["page_size"]
    assert parse_regions(json.dumps([entry]).encode(), 4096)[0].page_size == 4096


@pytest.mark.parametrize(
    ("regs", "size", "message"),
    [
        ([region(0x10000, 8192, 0)], 4096, "beyond the memory file"),
        ([region(0x10000, 4096, 0)], 8192, "cover 4096 bytes but the memory file has 8192"),
        ([region(0x10000, 8192, 0), region(0x11000, 8192, 8192)], 16384, "overlap in the VM"),
        ([region(0x10000, 8192, 0), region(0x90000, 8192, 4096)], 16384, "overlap"),
        ([region(0x10001, 4096, 0)], 4096, "multiples"),
        ([region(0x10000, 4096, 0, 3000)], 4096, "power of two"),
        ([{**region(0x10000, 4096, 0), "page_size_kib": 4}], 4096, "differ"),
        ([{**region(0x10000, 4096, 0), "size": True}], 4096, "integer"),
        ([{"size": 4096, "offset": 0, "page_size": 4096}], 4096, "lacks base_host_virt_addr"),
        ([], 4096, "non-empty"),
        ([region(0x10000, 0, 0)], 4096, "size 0"),
        ([region(2**64 - 4096, 8192, 0)], 8192, "out of range|wraps"),
    ],
)
def test_invalid_regions_are_explained(regs: list[dict[str, int]], size: int, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        parse_regions(json.dumps(regs).encode(), size)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=6),
    max_leaves=20,
)
region_like = st.fixed_dictionaries(
    {k: st.integers(min_value=-1, max_value=2**65) | st.sampled_from([0, 4096, 8192, 2 * MiB])
     for k in ("base_host_virt_addr", "size", "offset", "page_size", "page_size_kib")}
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512) | st.lists(json_values).map(lambda v: json.dumps(v).encode())
       | st.lists(region_like, max_size=4).map(lambda v: json.dumps(v).encode()),
       st.integers(min_value=1, max_value=4))
def test_handshake_parser_is_total(data: bytes, pieces: int) -> None:
    """Any bytes, in any split: either regions that satisfy every rule, or HandshakeError."""
    framer = JsonFramer()
    step = max(1, len(data) // pieces)
    try:
        framed = None
        for i in range(0, max(len(data), 1), step):
            framed = framer.feed(data[i : i + step])
            if framed is not None:
                break
        if framed is None:
            return
        regions = parse_regions(framed, 64 * MiB)
    except HandshakeError:
        return
    assert sum(r.size for r in regions) == 64 * MiB
    for a, b in itertools.pairwise(regions):
        assert a.end <= b.base


# --- metrics, working sets, sizes -----------------------------------------------------------------


def test_histogram_percentiles_never_under_report() -> None:
    h = Histogram()
    for us in range(1, 1001):
        h.add(us * 1000)
    data = h.to_json()
    assert 500 <= data["p50_us"] <= 600
    assert 990 <= data["p99_us"] <= 1000
    assert data["max_us"] == 1000 and data["count"] == 1000
    assert sum(data["buckets_us"].values()) == 1000


def test_working_set_round_trip_and_staleness(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    mem.write_bytes(bytes(64 * 4096))
    rec = workingset.Recorder()
    for off in (0, 4096, 8192, 40960, 16384):
        rec.add(off, 4096)
    assert rec.snapshot() == [(0, 12288), (40960, 4096), (16384, 4096)]
    path = workingset.path_for_mem_file(mem)
    workingset.save(path, mem, rec.snapshot())
    assert workingset.load(path, mem) == rec.snapshot()
    mem.write_bytes(bytes(32 * 4096))  # the memory file changed: the working set no longer applies
    assert workingset.load(path, mem) is None
    path.write_bytes(b"junk")
    assert workingset.load(path, mem) is None


def test_working_set_maps_onto_regions_in_order() -> None:
    regions = [Region(0x100000, 8 * 4096, 0, 4096), Region(0x900000, 8 * 4096, 8 * 4096, 4096)]
    segs = _segments_for(regions, [(6 * 4096, 4 * 4096), (0, 4096)])
    assert [(s.region_index, s.lo, s.hi) for s in segs] == [(0, 6, 8), (1, 0, 2), (0, 0, 1)]


def test_parse_size() -> None:
    assert parse_size("64K") == 65536 and parse_size("1M") == MiB and parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("64Q")


def test_uffd_msg_decoding() -> None:
    raw = ioctls.MSG.pack(ioctls.UFFD_EVENT_PAGEFAULT, 0, 0x7F0000001000, 0) + ioctls.MSG.pack(
        ioctls.UFFD_EVENT_REMOVE, 0x7F0000000000, 0x7F0000010000, 0
    )
    events = ioctls.parse_events(raw + b"\x00" * 5)
    assert events[0] == ioctls.Event(ioctls.UFFD_EVENT_PAGEFAULT, 0, 0x7F0000001000)
    assert events[1] == ioctls.Event(ioctls.UFFD_EVENT_REMOVE, 0x7F0000000000, 0x7F0000010000)


# --- commands --------------------------------------------------------------------------------------


def _serve_args(**kw: object) -> argparse.Namespace:
    base = {"snapshot": None, "mem_file": None, "socket": None, "prefetch": "on", "fault_around": "64K",
            "metrics_json": None}
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def process_umask() -> Iterator[None]:
    """`snapshot serve` owns its process and sets its umask to 077; put this test process's back, or directories
    later tests make for other users (tests/root/test_fusepipe_posix.py runs checks as nobody) are private."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


def test_snapshot_serve_argument_errors(tmp_path: Path, process_umask: None) -> None:
    with pytest.raises(FcvmError, match="SNAPSHOT, or both"):
        snapshot_serve.run(_serve_args(mem_file=str(tmp_path / "m")))
    with pytest.raises(FcvmError, match="no snapshot named 'nope'"):
        snapshot_serve.run(_serve_args(snapshot="nope"))
    mem = tmp_path / "m"
    mem.write_bytes(bytes(4096))
    with pytest.raises(FcvmError, match="power of two"):
        snapshot_serve.run(_serve_args(mem_file=str(mem), socket=str(tmp_path / "s"), fault_around="48K"))


def test_snapshot_ls_groups_servers_under_their_snapshot(capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    store.add_snapshot("web", "/snaps/web", vm_id=None, info={})
    metrics = {"server": {"clients_total": 1, "clients_live": 1, "working_set_bytes": 4096},
               "clients": [{"client": "42-1", "pid": 42, "state": "serving", "faults": 3, "bytes_copied": 8192,
                            "zero_bytes": 0, "prefetch": "off", "prefetch_bytes": 0,
                            "latency": {"p50_us": 20.0, "p99_us": 40.0}}]}
    row = store.create_vm("serve-web", kind="serve", process=ProcessRef.self(),
                          config={"snapshot": "web", "socket": "/snaps/web/uffd.sock", "metrics": metrics})
    store.update_vm(row.id, status="running")
    store.create_vm("serve-x", kind="serve", process=ProcessRef.self(), config={"mem_file": "/m"})
    store.close()
    assert snapshot_ls.run(argparse.Namespace(json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    (snap,) = data["snapshots"]
    assert snap["name"] == "web" and snap["servers"][0]["clients"][0]["faults"] == 3
    assert [s["name"] for s in data["servers"]] == ["serve-x"]
    assert snapshot_ls.run(argparse.Namespace(json=False)) == 0
    text = capsys.readouterr().out
    assert "web" in text and "42-1" in text


# --- holes -----------------------------------------------------------------------------------------


def _file_with_data(path: Path, size: int, data: list[tuple[int, int]]) -> Path:
    """A sparse file (truncate) holding random bytes at the given (offset, length) ranges (pwrite)."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in data:
            os.pwrite(f.fileno(), os.urandom(length), offset)
    return path


def _holes_of(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return holes.find(fd, path.stat().st_size).ranges()
    finally:
        os.close(fd)


def test_hole_map_is_exact(tmp_path: Path) -> None:
    # 64 KiB-aligned, so exact on any filesystem block size up to 64 KiB
    data = [(64 * KiB, 64 * KiB), (512 * KiB, 192 * KiB), (960 * KiB, 64 * KiB)]
    mem = _file_with_data(tmp_path / "m", MiB, data)
    assert _holes_of(mem) == [(0, 64 * KiB), (128 * KiB, 512 * KiB), (704 * KiB, 960 * KiB)]
    tail = _file_with_data(tmp_path / "tail", MiB, [(0, 64 * KiB)])  # data first, a hole up to EOF
    assert _holes_of(tail) == [(64 * KiB, MiB)]


def test_hole_map_of_an_all_hole_and_a_dense_file(tmp_path: Path) -> None:
    assert _holes_of(_file_with_data(tmp_path / "empty", 4 * MiB, [])) == [(0, 4 * MiB)]
    dense = tmp_path / "dense"
    dense.write_bytes(bytes(MiB))  # zeros written out are data, not holes
    assert _holes_of(dense) == []
    fd = os.open(dense, os.O_RDONLY)
    try:
        assert holes.find(fd, MiB).total == 0
    finally:
        os.close(fd)


def test_without_seek_hole_support_the_whole_file_is_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = _file_with_data(tmp_path / "m", MiB, [(64 * KiB, 64 * KiB)])

    def no_seek_hole(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return os.lseek(fd, pos, how)

    monkeypatch.setattr(holes.os, "lseek", no_seek_hole)
    assert _holes_of(mem) == []


def test_only_pages_entirely_inside_a_hole_are_holes() -> None:
    hmap = holes.HoleMap(64 * PAGE, [(100, 3 * PAGE + 5), (8 * PAGE, 12 * PAGE), (20 * PAGE, 64 * PAGE)])
    assert hmap.total == 3 * PAGE - 95 + 4 * PAGE + 44 * PAGE
    # page 0 is partly data, page 3 too; page 1-2 are holes
    assert hmap.page_runs(0, 64 * PAGE, PAGE) == [(1, 3), (8, 12), (20, 64)]
    # a region at file offset 10 pages, 16 pages long: clipped, indices from the region's start
    assert hmap.page_runs(10 * PAGE, 16 * PAGE, PAGE) == [(0, 2), (10, 16)]
    # 32 KiB pages: only big pages 3-7 (4 KiB pages 24-63) lie wholly inside a hole
    assert hmap.page_runs(0, 64 * PAGE, 8 * PAGE) == [(3, 8)]
    assert holes.HoleMap(PAGE).page_runs(0, PAGE, PAGE) == []


class _RecordingCopier:
    """Stands in for ioctls.Copier: records each fill as ("copy" | "zero", first page, pages)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.calls: list[tuple[str, int, int]] = []

    def copy(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
        self.calls.append(("copy", (dst - self.base) // PAGE, length // PAGE))
        return length

    def zeropage(self, fd: int, dst: int, length: int, mode: int = 0) -> int:
        self.calls.append(("zero", (dst - self.base) // PAGE, length // PAGE))
        return length


def test_fault_windows_split_holes_from_data(tmp_path: Path) -> None:
    """64 KiB windows (16 pages) never mix copied and zero pages; huge regions copy their holes."""
    # data at pages 0-2, 20 and 40-49 of the 4 KiB region; the 2 MiB region is all hole
    size = 64 * PAGE + 2 * MiB
    hole_map = holes.HoleMap(size, [(3 * PAGE, 20 * PAGE), (21 * PAGE, 40 * PAGE), (50 * PAGE, size)])
    mem = _file_with_data(tmp_path / "m", size, [])
    server = Server(ServeConfig(mem_file=mem, socket=tmp_path / "s", prefetch=False))
    try:
        base, huge_base = 0x7F00_0000_0000, 0x7F10_0000_0000
        regions = [Region(base, 64 * PAGE, 0, PAGE), Region(huge_base, 2 * MiB, 64 * PAGE, 2 * MiB)]
        metrics = ClientMetrics("t-1", 1, 0, 0)
        client = Client("t-1", None, -1, None, regions, metrics, hole_map)
        states = client.states[0]
        assert states[:3] == bytes([MISSING]) * 3 and states[3:20] == bytes([HOLE]) * 17
        assert states[20] == MISSING and states[50:] == bytes([HOLE]) * 14
        assert client.states[1] == bytes([MISSING])  # hugetlbfs: no zero page, its hole is data
        assert metrics.hole_bytes == (64 - 3 - 1 - 10) * PAGE
        copier = _RecordingCopier(base)
        client.copier = copier  # type: ignore[assignment]
        for page in (1, 5, 20, 17, 45, 33, 60):
            assert server._serve_fault(client, base + page * PAGE)
        assert copier.calls == [
            ("copy", 0, 3),  # data shorter than its window; the hole starts mid-window
            ("zero", 3, 13),  # the rest of window 0
            ("copy", 20, 1),  # one data page alone in a hole window
            ("zero", 16, 4),  # the hole before it, in the same window
            ("copy", 40, 8),  # data run crossing a window edge: this window's part ...
            ("zero", 32, 8),  # ... the hole before it
            ("zero", 50, 14),  # the hole at the end: up to the window edge, never past the region
        ]
        assert metrics.zero_faults == 4 and metrics.zero_bytes == (13 + 4 + 8 + 14) * PAGE
        assert metrics.bytes_copied == 12 * PAGE
        copier.base = huge_base
        assert server._serve_fault(client, huge_base + 4096)
        assert copier.calls[-1] == ("copy", 0, 512)  # copied from the file's zeros
    finally:
        server._shutdown()
