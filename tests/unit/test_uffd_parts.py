"""UFFD server pieces that need no kernel: handshake framing and validation (fuzzed), metrics,
working-set files, and `fcvm snapshot ls`."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcvm.commands import snapshot_ls, snapshot_serve
from fcvm.core.errors import FcvmError
from fcvm.core.proc import ProcessRef
from fcvm.state.store import Store
from fcvm.uffd import ioctls, workingset
from fcvm.uffd.handshake import MAX_HANDSHAKE, HandshakeError, JsonFramer, Region, parse_regions
from fcvm.uffd.metrics import Histogram
from fcvm.uffd.server import _segments_for, parse_size

MiB = 1 << 20


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


def test_snapshot_serve_argument_errors(tmp_path: Path) -> None:
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
