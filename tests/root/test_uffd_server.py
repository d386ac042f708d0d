"""The UFFD page server against the Firecracker stand-in (fcvm-uffd-client), as real processes."""

from __future__ import annotations

import array
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcvm.core.proc import ProcessRef
from fcvm.state.store import Store
from fcvm.uffd import holes, ioctls, workingset
from fcvm.uffd.handshake import HandshakeError, JsonFramer, parse_regions
from fcvm_standins.uffd_client import anonymous_bytes
from tests.support import NOBODY, as_other_user, require

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
pytestmark = pytest.mark.usefixtures("userfaultfd")


def _random_file(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(rng.randbytes(8 * MiB))
        f.write(rng.randbytes(size % (8 * MiB)))
    return path


@pytest.fixture(scope="module")
def mem512(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _random_file(tmp_path_factory.mktemp("uffd") / "memory", 512 * MiB, 512)


@pytest.fixture(scope="module")
def mem64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _random_file(tmp_path_factory.mktemp("uffd") / "memory", 64 * MiB, 64)


class Served:
    """`fcvm snapshot serve --mem-file ... --socket ...` in a subprocess."""

    def __init__(self, mem: Path, workdir: Path, *extra: str) -> None:
        self.mem = mem
        self.socket = workdir / "uffd.sock"
        self.metrics_path = workdir / "metrics.json"
        self.log = (workdir / "serve.log").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fcvm", "snapshot", "serve", "--mem-file", str(mem),
             "--socket", str(self.socket), "--metrics-json", str(self.metrics_path), *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "server did not listen"
            time.sleep(0.02)
        store = Store()
        rows = [vm for vm in store.list_vms(kind="serve") if vm.pid == self.proc.pid]
        store.close()
        assert rows, "the server did not record itself in the store"
        self.row_id = rows[0].id

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout) == 0, self.output()
        return json.loads(self.metrics_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait_for_faults(self, pid: int, timeout: float = 60) -> None:
        """Until the metrics the server publishes to its row (about every second) show faults by `pid`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            store = Store()
            row = store.get_vm(self.row_id)
            store.close()
            clients = row.config.get("metrics", {}).get("clients", []) if row else []
            if any(c["pid"] == pid and c["faults"] > 0 for c in clients):
                return
            time.sleep(0.1)
        raise AssertionError(f"client {pid} made no fault within {timeout} s:\n{self.output()}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Served] = []

    def start(mem: Path, *extra: str) -> Served:
        workdir = tmp_path / f"serve{len(started)}"
        workdir.mkdir()
        served = Served(mem, workdir, *extra)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def _client_cmd(served: Served, *args: str) -> list[str]:
    return [sys.executable, "-m", "fcvm_standins.uffd_client", "--mem-file", str(served.mem),
            "--socket", str(served.socket), *args]


def start_client(served: Served, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_client_cmd(served, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_client(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, list[dict[str, Any]]]:
    out, err = proc.communicate(timeout=timeout)
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert reports, f"no report from the client (exit {proc.returncode}): {err}"
    return proc.returncode, reports


def run_client(served: Served, *args: str, timeout: float = 120) -> dict[str, Any]:
    code, reports = finish_client(start_client(served, *args), timeout)
    report = reports[-1]
    assert code == 0 and report["ok"], report
    return report


def snapshot_ls() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "fcvm", "snapshot", "ls", "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


# --- serving -------------------------------------------------------------------------------------


def test_one_client_512m_byte_exact(serve: Any, mem512: Path) -> None:
    served = serve(mem512, "--prefetch", "off", "--fault-around", "64K")
    report = run_client(served, "--pattern", "sequential", "--threads", "4")
    assert report["verify"]["pages"] == 512 * MiB // 4096
    assert report["verify"]["mismatches"] == 0
    metrics = served.stop()
    (client,) = metrics["clients"]
    assert client["pid"] == report["pid"]  # identified by SO_PEERCRED
    assert client["bytes_copied"] == 512 * MiB  # every page exactly once
    assert client["faults"] <= 512 * MiB // (64 * 1024) + 8  # fault-around: one fault per 64 KiB
    assert client["latency"]["count"] == client["faults"]
    assert client["state"] == "exited"
    assert not served.socket.exists()


def test_eight_concurrent_clients_random(serve: Any, mem512: Path) -> None:
    served = serve(mem512, "--prefetch", "off")
    procs = [start_client(served, "--pattern", "random", "--seed", str(i), "--threads", "2", "--no-latency")
             for i in range(8)]
    reports = []
    for proc in procs:
        code, out = finish_client(proc, timeout=300)
        assert code == 0 and out[-1]["ok"], out
        reports.append(out[-1])
    assert all(r["verify"]["pages"] == 512 * MiB // 4096 for r in reports)
    # `fcvm snapshot ls --json` shows the server and its per-client metrics (published each second)
    deadline = time.monotonic() + 10
    while True:
        listing = snapshot_ls()
        servers = [s for s in listing["servers"] if s["id"] == served.row_id]
        if servers and servers[0]["clients_total"] == 8 and len(servers[0]["clients"]) == 8:
            break
        assert time.monotonic() < deadline, listing
        time.sleep(0.2)
    metrics = served.stop()
    assert sorted(c["pid"] for c in metrics["clients"]) == sorted(r["pid"] for r in reports)
    assert all(c["bytes_copied"] == 512 * MiB for c in metrics["clients"])


def test_two_huge_regions_with_x86_gap(serve: Any, tmp_path: Path) -> None:
    """4.5 GiB of guest memory split at 3 GiB with a 1 GiB hole, as on x86; sparse file, random islands."""
    mem = tmp_path / "memory"
    size = 4 * GiB + 512 * MiB
    rng = random.Random(3)
    with mem.open("wb") as f:
        f.truncate(size)
        for offset in (0, 3 * GiB - MiB, 3 * GiB, size - MiB, *(rng.randrange(0, size // MiB) * MiB for _ in range(8))):
            f.seek(offset)
            f.write(rng.randbytes(MiB))
    served = serve(mem, "--prefetch", "off", "--fault-around", "256K")
    report = run_client(
        served, "--regions", "2", "--gap", "1G", "--pattern", "random", "--fraction", "0.002",
        "--touch-range", f"{3 * GiB - 256 * 1024}:{512 * 1024}", "--touch-range", f"{size - 8192}:8192",
        "--threads", "4",
    )
    first, second = report["regions"]
    assert first["size"] == 3 * GiB and first["offset"] == 0
    assert second["offset"] == 3 * GiB and second["size"] == size - 3 * GiB
    assert second["base_host_virt_addr"] - (first["base_host_virt_addr"] + first["size"]) == GiB
    metrics = served.stop()
    (client,) = metrics["clients"]
    assert client["regions"] == 2 and client["errors"] == 0


@pytest.mark.parametrize("when", ["before", "during", "after"])
def test_remove_events_read_as_zero(serve: Any, mem64: Path, when: str) -> None:
    served = serve(mem64, "--prefetch", "off")
    report = run_client(
        served, "--pattern", "sequential", "--threads", "4", "--remove", "8M:4M", "--remove", "40M:1M",
        "--remove-when", when,
    )
    assert report["verify"]["zero_pages"] == 5 * MiB // 4096
    metrics = served.stop()
    (client,) = metrics["clients"]
    assert client["removes"] >= 2
    assert client["zero_faults"] > 0
    assert client["errors"] == 0


def test_handshake_in_pieces_is_framed_without_eof(serve: Any, mem64: Path) -> None:
    served = serve(mem64, "--prefetch", "off")
    run_client(served, "--pieces", "3", "--pattern", "random", "--fraction", "0.25")
    assert served.stop()["server"]["rejected"] == 0


def test_client_killed_mid_stream(serve: Any, mem512: Path) -> None:
    served = serve(mem512, "--prefetch", "off", "--fault-around", "4K")
    victim = start_client(served, "--pattern", "random", "--threads", "2", "--no-verify", "--hold", "-1")
    survivor = start_client(served, "--pattern", "random", "--threads", "2", "--fraction", "0.5", "--seed", "9")
    served.wait_for_faults(victim.pid)  # mid-stream: faulting, far from done (4K windows over 512 MiB)
    victim.kill()
    victim.wait(10)
    code, reports = finish_client(survivor)
    assert code == 0 and reports[-1]["ok"]
    run_client(served, "--pattern", "random", "--fraction", "0.1", "--seed", "5")  # still serving
    metrics = served.stop()
    dead = next(c for c in metrics["clients"] if c["pid"] == victim.pid)
    assert dead["state"] == "exited" and dead["faults"] > 0
    assert dead["bytes_copied"] < 512 * MiB  # it really died mid-stream
    ends = [e for e in metrics["server"]["events"] if e["event"] == "client-end" and e["pid"] == victim.pid]
    assert ends and ends[0]["reason"] in ("process exited", "address space gone (ESRCH)")


def test_sigterm_stops_clones_before_exiting(serve: Any, mem64: Path) -> None:
    served = serve(mem64, "--prefetch", "off")
    clone = start_client(served, "--pattern", "sequential", "--fraction", "0.5", "--hold", "-1",
                         "--sigterm-touch", "512")
    assert clone.stdout is not None
    ready = json.loads(clone.stdout.readline())  # the first report: touched and verified, now holding
    assert ready["ok"]
    store = Store()
    row = store.create_vm("clone-a", kind="clone", process=ProcessRef.of(clone.pid), serve_id=served.row_id)
    store.update_vm(row.id, status="running")
    served.proc.send_signal(signal.SIGTERM)
    code, reports = finish_client(clone, timeout=60)
    sigterm = reports[-1]["sigterm"]
    # The clone got SIGTERM while its server still served: 512 fresh pages faulted in and verified.
    assert code == 0 and sigterm["pages"] == 512 and sigterm["ok"]
    metrics = served.stop()
    events = metrics["server"]["events"]
    order = [e["event"] for e in events]
    assert order.index("stop") < order.index("clone-stop") < order.index("clone-stopped") < order.index("exit")
    stopped = next(e for e in events if e["event"] == "clone-stopped")
    assert stopped["pid"] == clone.pid and stopped["alive"] is False
    assert next(e for e in events if e["event"] == "exit")["t"] >= sigterm["done"]
    serve_row = store.get_vm(served.row_id)
    assert serve_row is not None and serve_row.status == "exited" and serve_row.exit_code == 0
    store.close()


def test_server_killed_client_stalls_instead_of_reading_zeros(serve: Any, mem64: Path) -> None:
    served = serve(mem64, "--prefetch", "off")
    client = start_client(served, "--pattern", "random", "--delay", "1.0", "--stall-timeout", "1.5")
    time.sleep(0.5)  # handshake done, nothing touched yet
    served.kill()
    code, reports = finish_client(client, timeout=30)
    report = reports[-1]
    assert code == 3 and report["stalled"]  # the VM hangs (fail closed) ...
    assert "verify" not in report  # ... no touch ever returned, so no zero page was ever read
    listing = snapshot_ls()
    (row,) = [s for s in listing["servers"] if s["id"] == served.row_id]
    assert row["status"] == "stale"


# --- malformed handshakes ------------------------------------------------------------------------


def _valid_payload(mem_size: int) -> list[dict[str, Any]]:
    return [{"base_host_virt_addr": 0x7F0000000000, "size": mem_size, "offset": 0,
             "page_size": 4096, "page_size_kib": 4096}]


def _mutations(mem_size: int) -> st.SearchStrategy[bytes]:
    valid = _valid_payload(mem_size)
    region = valid[0]
    bad_values = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(allow_nan=False),
                           st.integers(min_value=-(2**70), max_value=2**70))
    broken_field = st.builds(
        lambda key, value: json.dumps([{**region, key: value}]).encode(),
        st.sampled_from(sorted(region)), bad_values,
    )
    structural = st.sampled_from([
        b"", b"{}", b"[]", b"null", b"[1]", b'"x"', b"[{}]", b"[" * 5000 + b"]" * 5000,
        json.dumps([{**region, "size": mem_size // 2}]).encode(),  # does not cover the file
        json.dumps([{**region, "size": mem_size * 2}]).encode(),  # larger than the file
        json.dumps([{**region, "size": mem_size // 2},
                    {**region, "offset": mem_size // 2, "size": mem_size // 2,
                     "base_host_virt_addr": region["base_host_virt_addr"] + 4096}]).encode(),  # overlap
        json.dumps([{**region, "page_size": 4096, "page_size_kib": 4}]).encode(),
        json.dumps(valid).encode() + b"garbage",
        json.dumps(valid).encode()[:-3],  # incomplete, then EOF
    ])
    return st.one_of(structural, broken_field, st.binary(max_size=300))


def _acceptable(payload: bytes, mem_size: int) -> bool:
    try:
        framed = JsonFramer().feed(payload)
        return framed is not None and bool(parse_regions(framed, mem_size))
    except HandshakeError:
        return False


def _send_raw(path: Path, payload: bytes, fds: list[int]) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([payload], anc)
    finally:
        sock.close()


def test_malformed_handshakes_are_rejected_and_others_keep_being_served(serve: Any, mem64: Path) -> None:
    served = serve(mem64, "--prefetch", "off")
    healthy = start_client(served, "--pattern", "random", "--threads", "2", "--delay", "0.5")
    sent = [0]
    mem_size = mem64.stat().st_size

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=_mutations(mem_size), fd_kind=st.sampled_from(["none", "pipe", "uffd", "two"]))
    def send_one(payload: bytes, fd_kind: str) -> None:
        fds: list[int] = []
        if fd_kind == "pipe":
            fds = list(os.pipe())
        elif fd_kind in ("uffd", "two"):
            fds = [ioctls.create() for _ in range(1 if fd_kind == "uffd" else 2)]
        try:
            if fd_kind == "uffd" and _acceptable(payload, mem_size):
                return  # a valid handshake: not what this test is about
            _send_raw(served.socket, payload, fds)
            sent[0] += 1
        finally:
            for fd in fds:
                os.close(fd)

    send_one()
    code, reports = finish_client(healthy)
    assert code == 0 and reports[-1]["ok"]  # served byte-exact while the fuzzing went on
    run_client(served, "--pattern", "random", "--fraction", "0.2")
    assert served.proc.poll() is None, served.output()
    metrics = served.stop()
    assert metrics["server"]["rejected"] == sent[0]
    rejected = [c for c in metrics["clients"] if c["state"] == "rejected"]
    assert all(c["last_error"] for c in rejected)
    assert "Traceback" not in served.output()


def test_rejected_uffd_is_kept_open_while_its_process_lives(serve: Any, mem64: Path) -> None:
    """Fail closed: even a rejected client's uffd is closed only after that process exits."""
    served = serve(mem64, "--prefetch", "off")
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os,sys,socket,array; from fcvm.uffd import ioctls; fd=ioctls.create(); ioctls.api(fd);"
         "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
         "s.sendmsg([b'[{\"bad\": 1}]'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [fd]))]);"
         "os.close(fd); print('sent', flush=True); sys.stdin.read()", str(served.socket)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "sent"

    def server_uffds() -> int:
        fd_dir = Path(f"/proc/{served.proc.pid}/fd")
        count = 0
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(fd) == "anon_inode:[userfaultfd]"
        return count

    deadline = time.monotonic() + 5
    while server_uffds() != 1:
        assert time.monotonic() < deadline, "the server did not keep the rejected uffd"
        time.sleep(0.05)
    child.stdin.close()
    child.wait(10)
    deadline = time.monotonic() + 5
    while server_uffds() != 0:
        assert time.monotonic() < deadline, "the server did not release the uffd after its process exited"
        time.sleep(0.05)
    assert served.stop()["server"]["rejected"] == 1


def test_only_the_servers_uid_and_root_are_served(mem64: Path) -> None:
    """A client reads the snapshot's memory, the guest's secrets. The socket is owner-only, and even one made
    reachable (a chmod, a path in a shared directory) refuses other uids by their SO_PEERCRED at once."""
    shared = Path(tempfile.mkdtemp(prefix="fcvm-uffd-", dir="/tmp"))
    shared.chmod(0o711)  # others may pass through to the socket
    served = Served(mem64, shared, "--prefetch", "off")
    try:
        assert stat.S_IMODE(served.socket.stat().st_mode) == 0o600

        def connect_and_wait() -> object:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(served.socket))
                client.settimeout(5)  # the handshake timeout is 10 s: only a refusal closes it sooner
                return client.recv(1)

        assert as_other_user(connect_and_wait) == "PermissionError: Permission denied"
        served.socket.chmod(0o666)
        assert as_other_user(connect_and_wait) == "ok: b''"  # closed without a word
        run_client(served, "--pattern", "random", "--fraction", "0.05")  # root still is served
        assert served.stop()["server"]["rejected"] == 1
        assert f"uid {NOBODY} may not be served" in served.output()
    finally:
        served.kill()
        shutil.rmtree(shared, ignore_errors=True)


# --- working-set prefetch and the snapshot form --------------------------------------------------


def test_working_set_recorded_then_prefetched(serve: Any, tmp_path: Path) -> None:
    mem = _random_file(tmp_path / "memory", 64 * MiB, 11)
    served = serve(mem, "--prefetch", "on")
    first = run_client(served, "--pattern", "random", "--fraction", "0.02", "--seed", "4")
    ws = tmp_path / "memory.working-set"
    deadline = time.monotonic() + 10
    while not ws.exists():  # written when the recording client exits
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = run_client(served, "--pattern", "working-set", "--delay", "0.5", "--threads", "2")
    assert second["pages_touched"] >= first["pages_touched"]  # windows around each fault are in the set
    metrics = served.stop()
    recorder, prefetched = metrics["clients"]
    assert recorder["prefetch"] == "recorded" and recorder["pid"] == first["pid"]
    assert prefetched["prefetch"] == "done"
    assert prefetched["prefetch_bytes"] == metrics["server"]["working_set_bytes"] == recorder["bytes_copied"]
    assert prefetched["faults"] == 0  # everything was there before the first touch


def test_snapshot_form_and_snapshot_ls(tmp_path: Path) -> None:
    snap_dir = tmp_path / "snap"
    snap_dir.mkdir()
    _random_file(snap_dir / "memory", 16 * MiB, 16)
    (snap_dir / "vmstate").write_bytes(b"")
    store = Store()
    store.add_snapshot("web", str(snap_dir), vm_id=None, info={})
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "fcvm", "snapshot", "serve", "web"], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        sock = snap_dir / "uffd.sock"
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        served = Served.__new__(Served)
        served.mem, served.socket = snap_dir / "memory", sock
        run_client(served, "--pattern", "random", "--fraction", "0.5")
        deadline = time.monotonic() + 10
        while True:
            (snap,) = snapshot_ls()["snapshots"]
            if snap["servers"] and snap["servers"][0]["clients_total"] == 1:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (server,) = snap["servers"]
        assert snap["name"] == "web" and server["pid"] == proc.pid and server["status"] == "running"
        assert server["clients"][0]["bytes_copied"] > 0
        text = subprocess.run([sys.executable, "-m", "fcvm", "snapshot", "ls"], capture_output=True, text=True,
                              check=True).stdout
        assert "web" in text and str(proc.pid) in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert (snap_dir / "working-set").exists() and not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


# --- holes: zero pages instead of private copies ------------------------------------------------


@dataclass(frozen=True)
class SparsePair:
    sparse: Path  # data extents written into a truncated file: everything else is a hole
    dense: Path  # the same bytes with the zeros written out (what Firecracker writes before holes are dug)
    data: list[tuple[int, int]]  # (offset, length) of each data extent, page-aligned

    @property
    def size(self) -> int:
        return self.sparse.stat().st_size

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.data)


def _data_extents(pages: int, seed: int) -> list[tuple[int, int]]:
    """About 25 % data, page-aligned but not 64 KiB-aligned, with the cases fault-around must split."""
    extents = [
        (0, 3),  # a data run shorter than a window; the hole after it starts mid-window
        (20, 1),  # one data page alone inside an otherwise empty window
        (16 * 5 + 7, 50),  # starts mid-window, spans several windows
    ]
    rng = random.Random(seed)
    pos = 200
    while True:
        pos += rng.randint(1, 700)  # a hole of 1 page to ~2.7 MiB
        length = rng.randint(1, 250)
        if pos + length >= pages - 40:
            break  # the file ends in a hole
        extents.append((pos, length))
        pos += length
    return [(p * PAGE, n * PAGE) for p, n in extents]


@pytest.fixture(scope="module")
def sparse96(tmp_path_factory: pytest.TempPathFactory) -> SparsePair:
    work = tmp_path_factory.mktemp("uffd-holes")
    size = 96 * MiB
    data = _data_extents(size // PAGE, 96)
    rng = random.Random(97)
    sparse = work / "sparse"
    with sparse.open("wb") as f:
        f.truncate(size)
        for offset, length in data:
            os.pwrite(f.fileno(), rng.randbytes(length), offset)
    dense = work / "dense"
    dense.write_bytes(sparse.read_bytes())
    fd = os.open(sparse, os.O_RDONLY)
    try:
        found = holes.find(fd, size).total
    finally:
        os.close(fd)
    require(found > 0, f"the filesystem under {work} reports no holes (no SEEK_HOLE)")
    return SparsePair(sparse, dense, data)


def _is_data_page(pair: SparsePair, page: int) -> bool:
    return any(o <= page * PAGE < o + n for o, n in pair.data)


@pytest.mark.parametrize("pattern", ["sequential", "random"])
def test_sparse_file_one_client_byte_exact(serve: Any, sparse96: SparsePair, pattern: str) -> None:
    served = serve(sparse96.sparse, "--prefetch", "off", "--fault-around", "64K")
    report = run_client(served, "--pattern", pattern, "--threads", "4")
    assert report["verify"]["pages"] == sparse96.size // PAGE and report["verify"]["mismatches"] == 0
    metrics = served.stop()
    assert metrics["server"]["mem_hole_bytes"] == sparse96.size - sparse96.data_bytes
    (client,) = metrics["clients"]
    # every data page copied exactly once, every hole page zero-filled, none the other way round
    assert client["bytes_copied"] == sparse96.data_bytes
    assert client["zero_bytes"] == client["hole_bytes"] == sparse96.size - sparse96.data_bytes
    assert client["zero_faults"] > 0 and client["errors"] == 0


def test_sparse_file_concurrent_clients(serve: Any, sparse96: SparsePair) -> None:
    served = serve(sparse96.sparse, "--prefetch", "off", "--fault-around", "64K")
    procs = [start_client(served, "--pattern", pattern, "--seed", str(i), "--threads", "2", "--no-latency")
             for i, pattern in enumerate(["random", "sequential", "random", "sequential"])]
    for proc in procs:
        code, reports = finish_client(proc, timeout=180)
        assert code == 0 and reports[-1]["ok"], reports
        assert reports[-1]["verify"]["pages"] == sparse96.size // PAGE
    metrics = served.stop()
    assert len(metrics["clients"]) == 4
    for client in metrics["clients"]:
        assert client["bytes_copied"] == sparse96.data_bytes
        assert client["zero_bytes"] == sparse96.size - sparse96.data_bytes
        assert client["errors"] == 0


def _held_client(served: Served) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = start_client(served, "--pattern", "sequential", "--threads", "2", "--hold", "-1")
    assert proc.stdout is not None
    report = json.loads(proc.stdout.readline())  # touched and verified, now holding its memory
    assert report["ok"], report
    return proc, report


def test_holes_cost_a_clone_no_private_memory(serve: Any, sparse96: SparsePair) -> None:
    """After touching all its memory, a clone of the sparse file privately holds about its data; a clone
    of the dense file (same bytes) holds all of it."""
    anon: dict[str, int] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for kind, mem in (("sparse", sparse96.sparse), ("dense", sparse96.dense)):
        served = serve(mem, "--prefetch", "off")
        proc, report = _held_client(served)
        try:
            anon[kind] = anonymous_bytes(proc.pid, report["regions"][0])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        (metrics[kind],) = served.stop()["clients"]
    size, data = sparse96.size, sparse96.data_bytes
    assert data < size * 0.35  # the fixture's premise: mostly holes
    assert anon["dense"] >= size * 0.95, anon
    assert anon["sparse"] <= data + size * 0.05, anon  # the holes map the shared zero page
    assert metrics["sparse"]["zero_faults"] > 0 and metrics["sparse"]["zero_bytes"] == size - data
    assert metrics["dense"]["zero_faults"] == 0 and metrics["dense"]["hole_bytes"] == 0
    assert metrics["dense"]["bytes_copied"] == size


def test_working_set_skips_holes(serve: Any, sparse96: SparsePair, tmp_path: Path) -> None:
    """The recorder keeps only copied (data) windows, and the prefetch never fills a hole."""
    mem = tmp_path / "memory"
    os.link(sparse96.sparse, mem)  # the working set is written next to the memory file: keep it here
    served = serve(mem, "--prefetch", "on")
    first = run_client(served, "--pattern", "random", "--fraction", "0.1", "--seed", "4")
    ws = workingset.path_for_mem_file(mem)
    deadline = time.monotonic() + 10
    while not ws.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runs = workingset.load(ws, mem)
    assert runs
    recorded = [p for off, n in runs for p in range(off // PAGE, (off + n) // PAGE)]
    assert all(_is_data_page(sparse96, p) for p in recorded)
    second = run_client(served, "--pattern", "sequential", "--delay", "0.5", "--threads", "2")
    metrics = served.stop()
    recorder, replay = metrics["clients"]
    assert recorder["pid"] == first["pid"] and replay["pid"] == second["pid"]
    assert replay["prefetch"] == "done" and replay["prefetch_bytes"] == len(recorded) * PAGE
    assert replay["prefetch_bytes"] + replay["bytes_copied"] == sparse96.data_bytes
    assert replay["zero_bytes"] == sparse96.size - sparse96.data_bytes


_HUGE_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


@pytest.fixture
def huge_pages_2m() -> Iterator[int]:
    """Reserve 40 more 2 MiB pages for one test (this machine keeps none), then give them back."""
    require(_HUGE_2M.is_dir(), "needs 2 MiB hugetlb pages")
    count = _HUGE_2M / "nr_hugepages"
    before = int(count.read_text())
    count.write_text(str(before + 40))
    try:
        free = int((_HUGE_2M / "free_hugepages").read_text())
        require(free >= 40, f"could reserve only {free} free 2 MiB pages")
        yield free
    finally:
        count.write_text(str(before))


def test_huge_regions_copy_their_holes(serve: Any, tmp_path: Path, huge_pages_2m: int) -> None:
    """hugetlbfs has no UFFDIO_ZEROPAGE: a hole in a 2 MiB region is copied (zeros) like data."""
    size = 64 * MiB
    mem = tmp_path / "memory"
    rng = random.Random(2)
    with mem.open("wb") as f:
        f.truncate(size)
        # not 2 MiB-aligned: some huge pages are part data, part hole; most are all hole
        for offset in (0, 3 * MiB + 12 * PAGE, 31 * MiB, 40 * MiB + 5 * PAGE, size - PAGE):
            os.pwrite(f.fileno(), rng.randbytes(100 * PAGE if offset < size - PAGE else PAGE), offset)
    served = serve(mem, "--prefetch", "off", "--fault-around", "64K")
    report = run_client(served, "--page-size", "2M", "--regions", "2", "--split", "32M", "--gap", "1G",
                        "--pattern", "random", "--threads", "4")
    assert all(r["page_size"] == 2 * MiB for r in report["regions"])
    assert report["verify"]["pages"] == size // PAGE
    metrics = served.stop()
    assert metrics["server"]["mem_hole_bytes"] > size // 2
    (client,) = metrics["clients"]
    assert client["errors"] == 0 and client["hole_bytes"] == 0 and client["zero_faults"] == 0
    assert client["bytes_copied"] == size  # every huge page copied once, holes included


@pytest.mark.parametrize("when", ["during", "after"])
def test_removed_huge_pages_read_as_zero(serve: Any, mem64: Path, huge_pages_2m: int, when: str) -> None:
    """hugetlbfs has no UFFDIO_ZEROPAGE: removed huge pages are refilled with copied zeros, never left blocked."""
    served = serve(mem64, "--prefetch", "off")
    report = run_client(served, "--page-size", "2M", "--pattern", "sequential", "--threads", "4",
                        "--remove", "8M:4M", "--remove", "40M:2M", "--remove-when", when)
    assert report["verify"]["zero_pages"] == 6 * MiB // PAGE
    (client,) = served.stop()["clients"]
    assert client["removes"] >= 2 and client["zero_faults"] > 0 and client["errors"] == 0
