"""Snapshots and clones under QEMU: one running VM becomes several clones, each with its own port, disk and
memory source (the snapshot's file or the UFFD page server), and nothing is left when they stop."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core.wait import wait_until
from tests.hoststate import HostState
from tests.vm.conftest import free_port
from tests.vm.support import PAGE, Server, fcvm, live_names, one_line_error, page, rows


@pytest.fixture
def site(tmp_path: Path) -> Path:
    directory = tmp_path / "site"
    directory.mkdir()
    (directory / "note.txt").write_text("before the snapshot\n")
    return directory


@pytest.fixture
def source(guest_assets: None, site: Path) -> Iterator[tuple[str, int]]:
    """A running httpd VM with a --map volume, and its snapshot `src-v1`."""
    port = free_port()
    fcvm("podman", "run", "-d", "--no-snapshot", "--name", "src", "-p", f"{port}:80", "--map", f"{site}:/data",
         "localhost/fcvm-demo-httpd")
    assert fcvm("exec", "src", "--", "cat", "/data/note.txt").stdout == "before the snapshot\n"
    assert PAGE in page(port)
    assert fcvm("snapshot", "create", "src", "--tag", "src-v1").stdout.strip() == "src-v1"
    yield "src-v1", port
    for name in live_names():
        fcvm("stop", name, check=False)


def test_clones_from_file_and_page_server_each_serve_their_own_port_and_disk(source: tuple[str, int],
                                                                           site: Path) -> None:
    tag, source_port = source
    before_clones = HostState.capture()
    server = Server(tag)
    try:
        ports = {}
        for name, memory in (("f1", "file"), ("f2", "file"), ("u1", "uffd"), ("u2", "uffd")):
            ports[name] = free_port()
            how = ["--snapshot", tag] if memory == "file" else ["--pid", str(server.pid)]
            fcvm("snapshot", "run", *how, "--name", name, "-p", f"{ports[name]}:80", "-d")
        (site / "note.txt").write_text("after the snapshot\n")
        for name, port in ports.items():
            assert PAGE in page(port), name
            assert fcvm("exec", name, "--", "cat", "/etc/hostname").stdout.strip() == "src"
            # The clone's own volume server serves the source's host directory, as it is now.
            assert fcvm("exec", name, "--", "cat", "/data/note.txt").stdout == "after the snapshot\n", name
        # The source keeps serving throughout.
        assert PAGE in page(source_port)
        # A write on one clone's disk is invisible to the other clones and to the source.
        fcvm("exec", "f1", "--vm", "--", "sh", "-c", "echo mine > /root/f1-only && sync")
        for other in ("f2", "u1", "u2", "src"):
            assert fcvm("exec", other, "--vm", "--", "cat", "/root/f1-only", check=False).returncode != 0, other
        # The guest wall clock was frozen at the snapshot instant; a restored agent sets it from the host's.
        for name in ports:
            guest = float(fcvm("exec", name, "--vm", "--", "date", "+%s").stdout)
            assert abs(guest - time.time()) < 2, name
        served = [s for s in Server.servers() if s["pid"] == server.pid]
        assert served and served[0]["clients_live"] == 2
        data = json.loads(fcvm("snapshot", "ls", "--json").stdout)
        assert [s["name"] for s in data["snapshots"] if s["kind"] == "user"] == [tag]
    finally:
        for name in ("f1", "f2", "u1", "u2"):
            fcvm("stop", name, check=False)
        server.stop()
    assert HostState.capture().diff(before_clones) == {}


def test_a_sigkilled_page_server_takes_its_clones_down_and_nothing_is_left(source: tuple[str, int]) -> None:
    tag, _ = source
    before = HostState.capture()
    server = Server(tag)
    fcvm("snapshot", "run", "--pid", str(server.pid), "--name", "u1", "-p", f"{free_port()}:80", "-d")
    server.process.kill()
    server.process.wait()
    # Without its page server a clone would hang on its next fault: it stops itself (or `ls` reaps it).
    assert wait_until(lambda: "u1" not in live_names(), 60, interval=0.5)
    assert HostState.capture().diff(before) == {}


def test_a_sigkilled_clone_leaves_nothing_after_ls(source: tuple[str, int]) -> None:
    tag, _ = source
    before = HostState.capture()
    fcvm("snapshot", "run", "--snapshot", tag, "--name", "c1", "-p", f"{free_port()}:80", "-d")
    clone = next(r for r in rows() if r["name"] == "c1")
    os.kill(int(str(clone["pid"])), signal.SIGKILL)
    assert wait_until(lambda: "c1" not in live_names(), 60, interval=0.5)
    assert HostState.capture().diff(before) == {}


def test_exec_one_shot_prints_the_output_returns_the_code_and_cleans_up(source: tuple[str, int]) -> None:
    tag, _ = source
    result = fcvm("snapshot", "run", "--snapshot", tag, "--exec", "sh -c 'cat /etc/hostname; exit 3'",
                  check=False)
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "src"
    assert live_names() == {"src"}


def test_a_snapshot_in_use_is_not_removed_unless_forced(source: tuple[str, int]) -> None:
    tag, _ = source
    fcvm("snapshot", "run", "--snapshot", tag, "--name", "c1", "-p", f"{free_port()}:80", "-d")
    one_line_error(fcvm("snapshot", "rm", tag, check=False), "in use by clone c1")
    fcvm("snapshot", "rm", "-f", tag)
    assert "c1" not in live_names()
    assert [s for s in json.loads(fcvm("snapshot", "ls", "--json").stdout)["snapshots"] if s["kind"] == "user"] == []


def test_bad_input_is_a_one_line_error_and_leaves_nothing(source: tuple[str, int], isolated_data_dir: Path) -> None:
    tag, source_port = source
    before = HostState.capture()
    one_line_error(fcvm("snapshot", "create", "nosuchvm", check=False), "no VM named 'nosuchvm'")
    one_line_error(fcvm("snapshot", "run", "--snapshot", "nosuchtag", check=False), "no snapshot named")
    one_line_error(fcvm("snapshot", "run", "--pid", "999999", check=False), "no memory server runs as pid 999999")
    # The port the source publishes is taken.
    one_line_error(fcvm("snapshot", "run", "--snapshot", tag, "--name", "c1", "-p", f"{source_port}:80",
                        check=False), f"host port {source_port}/tcp is already in use")
    snapshot_dir = isolated_data_dir / "snapshots" / tag
    # A snapshot of another QEMU version is refused before anything runs.
    description = snapshot_dir / "snapshot.json"
    original = description.read_text()
    description.write_text(json.dumps({**json.loads(original), "vmm_version": "6.0.0"}))
    one_line_error(fcvm("snapshot", "run", "--snapshot", tag, "--name", "c2", check=False),
                   "the snapshot was taken by QEMU 6.0.0")
    description.write_text(original)
    # A truncated memory file is refused; so is a missing one.
    memory = snapshot_dir / "memory"
    with memory.open("r+b") as handle:
        handle.truncate(memory.stat().st_size // 2)
    one_line_error(fcvm("snapshot", "run", "--snapshot", tag, "--name", "c3", check=False), "was truncated")
    memory.unlink()
    one_line_error(fcvm("snapshot", "run", "--snapshot", tag, "--name", "c4", check=False), "is missing")
    assert live_names() == {"src"}
    assert HostState.capture().diff(before) == {}
    # A stopped VM cannot be snapshotted.
    fcvm("stop", "src")
    one_line_error(fcvm("snapshot", "create", "src", "--tag", "late", check=False), "is not running")
