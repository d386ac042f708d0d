"""Warm starts: a cold `podman run` leaves snapshot cache entries behind, and later runs restore from the best
one that fits, indistinguishable from a cold run to the container and to the user."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fcvm.core.wait import wait_until
from tests.vm.conftest import free_port
from tests.vm.support import PAGE, fcvm, live_names, page

IMAGE = "localhost/fcvm-demo-httpd"


def inspect(name: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(fcvm("inspect", name).stdout)[0]
    return document


def started_from(name: str) -> str:
    config = inspect(name)["config"]
    assert isinstance(config, dict)
    return str(config["start"]["from"])


def cache_entries() -> list[dict[str, object]]:
    data = json.loads(fcvm("snapshot", "ls", "--json").stdout)
    return [s for s in data["snapshots"] if s["kind"] == "cache"]


def levels() -> set[str]:
    return {str(s["info"]["level"]) for s in cache_entries()}  # type: ignore[index]


def cold_run_leaving_entries(name: str, *extra: str) -> int:
    port = free_port()
    fcvm("podman", "run", "-d", "--name", name, "-p", f"{port}:80", *extra, IMAGE)
    assert started_from(name) == "cold"
    assert PAGE in page(port)
    # The startup entry is taken once the container reports healthy, behind the run's back.
    assert wait_until(lambda: levels() == {"startup", "prestart"}, 120, interval=0.5), cache_entries()
    fcvm("stop", name)
    return port


def test_later_runs_restore_from_the_best_entry_and_behave_like_cold_runs(guest_assets: None) -> None:
    cold_run_leaving_entries("web", "-e", "GREETING=first")
    # The same configuration, another host port: its container starts already running.
    port = free_port()
    fcvm("podman", "run", "-d", "--name", "web", "-p", f"{port}:80", "-e", "GREETING=first", IMAGE)
    try:
        assert started_from("web") == "startup"
        assert PAGE in page(port)
        assert fcvm("exec", "web", "--", "sh", "-c", "echo $GREETING; hostname").stdout.split() == ["first", "web"]
        guest = float(fcvm("exec", "web", "--vm", "--", "date", "+%s").stdout)
        assert abs(guest - time.time()) < 2
    finally:
        fcvm("stop", "web")
    # Another name and env: from the pre-start entry, which held nothing of the first run.
    port = free_port()
    fcvm("podman", "run", "-d", "--name", "other", "-p", f"{port}:80", "-e", "GREETING=second", IMAGE)
    try:
        assert started_from("other") == "prestart"
        assert PAGE in page(port)
        assert fcvm("exec", "other", "--", "sh", "-c", "echo $GREETING; hostname").stdout.split() == [
            "second", "other"]
        assert "first" not in fcvm("logs", "other").stdout
    finally:
        fcvm("stop", "other")
    # --no-snapshot boots cold.
    result = fcvm("podman", "run", "--rm", "--no-snapshot", "--name", "web", "-e", "GREETING=first", IMAGE,
                  "sh", "-c", "echo cold-run", check=False)
    assert "cold-run" in result.stdout
    # Each entry used once; the run from the pre-start entry left a startup entry of its own, unused so far.
    hits = sorted(int(str(s["hits"])) for s in cache_entries())
    assert hits == [0, 1, 1], cache_entries()


def _truncate(memory: Path) -> None:
    with memory.open("r+b") as handle:
        handle.truncate(memory.stat().st_size // 2)


def _zero(memory: Path) -> None:
    """Same size, no content: QEMU loads it, and the guest dies at once."""
    size = memory.stat().st_size
    memory.unlink()
    with memory.open("wb") as handle:
        handle.truncate(size)


@pytest.mark.parametrize("damage", [_truncate, _zero], ids=["truncated", "zeroed"])
def test_a_damaged_entry_falls_back_to_a_cold_boot_and_is_removed(damage: Callable[[Path], None],
                                                                  guest_assets: None, isolated_data_dir: Path) -> None:
    cold_run_leaving_entries("web")
    for entry in cache_entries():
        damage(Path(str(entry["path"])) / "memory")
    port = free_port()
    result = fcvm("podman", "run", "-d", "--name", "web", "-p", f"{port}:80", IMAGE)
    try:
        assert "could not be restored" in result.stderr and "booting cold" in result.stderr, result.stderr
        assert started_from("web") == "cold"
        assert PAGE in page(port)
    finally:
        fcvm("stop", "web")


def test_changed_assets_make_the_next_run_cold(guest_assets: None) -> None:
    cold_run_leaving_entries("web")
    # A different machine shape is a different key, exactly as a changed kernel, initramfs or rootfs hash is.
    fcvm("podman", "run", "-d", "--name", "web", "--mem", "768", "-p", f"{free_port()}:80", IMAGE)
    try:
        assert started_from("web") == "cold"
    finally:
        fcvm("stop", "web")


def test_two_concurrent_first_runs_make_one_entry_and_prune_frees_the_space(guest_assets: None) -> None:
    runs = [subprocess.Popen([sys.executable, "-m", "fcvm", "podman", "run", "-d", "--name", name,
                              "-p", f"{free_port()}:80", IMAGE], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for name in ("a", "b")]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read() if run.stderr else ""
    assert wait_until(lambda: len([e for e in cache_entries() if e["info"]["level"] == "prestart"]) == 1,  # type: ignore[index]
                      60, interval=0.5)
    fcvm("stop", "a", "b")
    assert cache_entries()
    out = fcvm("snapshot", "prune", "--all").stdout
    assert out.startswith("removed ") and cache_entries() == []


def test_sigkill_while_an_entry_is_created_leaves_no_usable_half_entry(guest_assets: None,
                                                                       isolated_data_dir: Path) -> None:
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "fcvm", "podman", "run", "--name", "web", "-p", f"{port}:80",
                              IMAGE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshots = isolated_data_dir / "snapshots"
    # Kill the run the moment a pre-start entry is being written (its partial directory appears).
    assert wait_until(lambda: snapshots.is_dir() and any(p.name.endswith(".partial") for p in snapshots.iterdir()),
                      300, interval=0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    fcvm("gc")
    assert not any(p.name.endswith(".partial") for p in snapshots.iterdir())
    # Whatever is left is whole: the next run restores from it or boots cold, and serves.
    fcvm("podman", "run", "-d", "--name", "web", "-p", f"{port}:80", IMAGE)
    try:
        assert started_from("web") in ("cold", "prestart")
        assert PAGE in page(port)
    finally:
        fcvm("stop", "web")
    assert "web" not in live_names()


def test_ctrl_c_just_after_the_page_leaves_no_entry_that_starts_a_container_on_its_way_out(
        guest_assets: None) -> None:
    # Ctrl-C comes while the startup entry may be being taken (the container has just become healthy).
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "fcvm", "podman", "run", "--name", "brief", "-p", f"{port}:80",
                              IMAGE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert PAGE in page(port, 300)
    finally:
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=300)
    # The same command again starts from whatever entry the first left, and its container stays up: one
    # restored on its way out would be gone within its 10 s stop timeout.
    port = free_port()
    fcvm("podman", "run", "-d", "--name", "brief", "-p", f"{port}:80", IMAGE)
    try:
        assert PAGE in page(port)
        assert not wait_until(lambda: inspect("brief")["status"] != "running", 30, interval=1)
        assert PAGE in page(port)
    finally:
        fcvm("stop", "brief")
