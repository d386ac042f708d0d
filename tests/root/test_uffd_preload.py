"""The UFFD preload library in a real QEMU 7.2: guest RAM served by the page server, and failing closed.

No guest kernel boots: QEMU starts with its vCPUs stopped (-S), and `pmemsave` over QMP makes QEMU read
its own guest RAM, which faults through the userfaultfd into the page server.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from fcvm.uffd import preload
from fcvm.uffd.server import ServeConfig, Server
from tests.support import require_tool

MiB = 1 << 20
PAGE = 4096
RAM = 64 * MiB
HOLE = (8 * MiB, 12 * MiB)  # a hole in the memory file: the guest must read zeros there
# microvm overlays guest RAM with the BIOS image up to 1 MiB (the legacy BIOS window), so `pmemsave`
# reads ROM there; compare only ranges that are plain RAM.
RAM_RANGES = ((0, 0xC0000), (1 * MiB, RAM))


@pytest.fixture(autouse=True)
def _prerequisites(userfaultfd: None) -> None:
    require_tool("qemu-system-x86_64")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("cc")
    return preload.build(tmp_path_factory.mktemp("preload"))


def _page(index: int) -> bytes:
    """Page `index` of the memory file: its own number, so a page served at the wrong address shows."""
    return struct.pack("<QQ", 0xFC7D_5EED_0000_0000, index) * (PAGE // 16)


def _expected(start: int, end: int) -> bytes:
    hole_start, hole_end = HOLE
    return b"".join(
        bytes(PAGE) if hole_start <= offset < hole_end else _page(offset // PAGE) for offset in range(start, end, PAGE)
    )


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("uffd-mem") / "memory"
    with path.open("wb") as f:
        for start, end in ((0, HOLE[0]), (HOLE[1], RAM)):
            f.seek(start)  # seeking over HOLE leaves it unwritten: a real hole
            f.write(_expected(start, end))
    return path


@pytest.fixture
def page_server(memory_file: Path, tmp_path: Path) -> Iterator[Server]:
    """The page server in a thread of the test, listening before QEMU starts (QEMU may fault at start)."""
    server = Server(ServeConfig(mem_file=memory_file, socket=tmp_path / "uffd.sock", prefetch=False,
                                shutdown_grace=1.0))
    thread = threading.Thread(target=server.serve_forever, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.config.socket.exists():
        assert thread.is_alive() and time.monotonic() < deadline, "the page server did not listen"
        time.sleep(0.01)
    yield server
    server.request_stop("test over")
    thread.join(timeout=20)
    assert not thread.is_alive(), "the page server did not stop"


def _start_qemu(workdir: Path, env: dict[str, str], backend_options: str = "") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
         "-object", f"memory-backend-ram,id=mem,size={RAM}{backend_options}",
         "-M", "microvm,memory-backend=mem", "-m", f"{RAM // MiB}M",
         "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off"],
        env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


class Qemus:
    """QEMUs started by one test, all killed at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []
        self.monitors: list[QEMUMonitorProtocol] = []

    def start(
        self, env: dict[str, str], backend_options: str = ""
    ) -> tuple[subprocess.Popen[bytes], QEMUMonitorProtocol]:
        """Start QEMU; return it and its QMP monitor once QMP answers: its guest RAM exists by then."""
        process = _start_qemu(self.workdir, env, backend_options)
        self.started.append(process)
        qmp_socket = self.workdir / "qmp.sock"
        deadline = time.monotonic() + 30
        while not qmp_socket.exists():
            if process.poll() is not None:
                pytest.fail(f"QEMU exited with {process.returncode}: {process.communicate()[1].decode()}")
            assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
            time.sleep(0.01)
        monitor = QEMUMonitorProtocol(str(qmp_socket))
        # The socket appears before machine initialisation; QMP's greeting comes only after it.
        monitor.connect()
        self.monitors.append(monitor)
        return process, monitor

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)
        for monitor in self.monitors:
            monitor.close()


@pytest.fixture
def qemus(tmp_path: Path) -> Iterator[Qemus]:
    launched = Qemus(tmp_path)
    yield launched
    launched.kill_all()


# reserve=off adds MAP_NORESERVE to the RAM mapping, the one flag the library tolerates besides its rule.
@pytest.mark.parametrize("backend_options", ["", ",reserve=off"], ids=["default", "reserve-off"])
def test_guest_ram_is_read_through_the_page_server(
    library: Path, page_server: Server, qemus: Qemus, tmp_path: Path, backend_options: str
) -> None:
    env = preload.env_for(page_server.config.socket, RAM, library)
    process, monitor = qemus.start(env, backend_options)

    assert preload.verify_client(process.pid)
    for start, end in RAM_RANGES:
        dump = tmp_path / f"ram-{start:x}"
        monitor.cmd("pmemsave", val=start, size=end - start, filename=str(dump))
        data = dump.read_bytes()
        expected = _expected(start, end)
        assert len(data) == len(expected)
        if data != expected:  # name the first wrong page rather than printing megabytes
            bad = next(o for o in range(0, len(data), PAGE) if data[o : o + PAGE] != expected[o : o + PAGE])
            pytest.fail(f"guest-physical page {start + bad:#x} does not hold the memory file's page")

    clients = page_server.metrics()["clients"]
    assert len(clients) == 1
    client = clients[0]
    assert client["pid"] == process.pid
    assert client["memory_bytes"] == RAM
    assert client["faults"] > 0
    assert client["zero_faults"] > 0, "the hole was not served as zero pages"
    assert client["errors"] == 0, client["last_error"]


def test_missing_page_server_makes_qemu_exit_at_once(library: Path, tmp_path: Path) -> None:
    env = preload.env_for(tmp_path / "no-such.sock", RAM, library)
    started = time.monotonic()
    process = _start_qemu(tmp_path, env)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1
    assert time.monotonic() - started < 10
    message = f"fcvm-uffd-preload: connect to the page server at {env['FCVM_UFFD_SOCKET']}: No such file or directory"
    assert message in stderr.decode()


@pytest.mark.parametrize(
    ("configured_size", "backend_options"),
    [(2 * RAM, ""), (RAM, ",share=on"), (None, "")],
    ids=["size-matching-no-mapping", "shared-ram-is-not-taken", "not-configured"],
)
def test_qemu_without_a_registered_ram_fails_verification(
    library: Path, qemus: Qemus, tmp_path: Path, configured_size: int | None, backend_options: str
) -> None:
    # The socket does not exist, so had the library taken any mapping QEMU would have exited.
    env = preload.env_for(tmp_path / "no-such.sock", configured_size or RAM, library)
    if configured_size is None:
        env = {"LD_PRELOAD": env["LD_PRELOAD"]}
    process, monitor = qemus.start(env, backend_options)

    status = monitor.cmd("query-status")
    assert isinstance(status, dict) and status["status"] == "prelaunch", "QEMU is not up and waiting"
    assert not preload.verify_client(process.pid)
