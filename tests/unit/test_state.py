from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fcvm.core.proc import ProcessRef
from fcvm.run.cleanup import reap_stale, replay
from fcvm.state import NameInUse, Store
from fcvm.state.journal import Journal
from tests.support import fake_owner


def test_live_names_are_unique_but_exited_names_can_be_reused() -> None:
    store = Store()
    first = store.create_vm("web", process=ProcessRef.self())
    with pytest.raises(NameInUse, match="'web' is already used"):
        store.create_vm("web")
    store.update_vm(first.id, status="exited", exit_code=0)
    second = store.create_vm("web")
    assert store.require_vm("web").id == second.id
    assert store.require_vm(first.id).status == "exited"


def _allocate_many(db: str, worker: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = Store(Path(db))
    got = []
    for i in range(10):
        vm = store.create_vm(f"w{worker}-{i}")
        got.append(store.allocate("subnet", vm.id, (str(n) for n in range(1000))))
        store.update_vm(vm.id, status="running", health="healthy")
    results.put(got)


def test_twenty_concurrent_writers_never_share_an_allocation(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    Store(Path(db)).close()
    results: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    workers = [multiprocessing.Process(target=_allocate_many, args=(db, w, results)) for w in range(20)]
    for worker in workers:
        worker.start()
    allocated = [value for _ in workers for value in results.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len(allocated) == 200
    assert len(set(allocated)) == 200, "two writers got the same address"
    store = Store(Path(db))
    assert len(store.list_vms()) == 200
    assert store.execute_integrity_check() == "ok"


def _open_fresh(db: str, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    Store(Path(db)).list_vms()


def test_processes_opening_a_new_store_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    # Two first `fcvm podman run`s on a new data dir: each used to switch the store to WAL, and sqlite answers the
    # loser with "database is locked" at once.
    for attempt in range(15):
        start = multiprocessing.Barrier(6)
        workers = [multiprocessing.Process(target=_open_fresh, args=(str(tmp_path / f"{attempt}.db"), start))
                   for _ in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0] * 6


def test_journal_replays_newest_first_and_forgets_what_it_undid(tmp_path: Path) -> None:
    store = Store()
    vm = store.create_vm("j")
    journal = Journal(store, vm.id)
    order: list[str] = []
    outer = tmp_path / "outer"
    outer.mkdir()
    inner = outer / "inner.sock"
    journal.record("dir", path=str(outer))
    inner.write_text("x")
    journal.record("socket", path=str(inner))
    # The socket must go before its directory; a reversed replay would still remove both, so observe order.
    original = os.unlink

    def spy(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        order.append(str(path))
        original(path)

    os.unlink = spy  # type: ignore[assignment]
    try:
        assert replay(store, vm.id) == []
    finally:
        os.unlink = original
    assert order[0] == str(inner)
    assert not outer.exists()
    assert store.journal_entries(vm.id) == []


def test_a_sigkilled_owner_is_reaped_with_its_resources(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("left behind unless reaped")
    child = fake_owner("victim", marker)
    store = Store()
    assert reap_stale(store) == []
    assert store.require_vm("victim").status == "running"
    child.send_signal(signal.SIGKILL)
    child.wait()
    reaped = reap_stale(store)
    assert [vm.name for vm in reaped] == ["victim"]
    vm = store.require_vm("victim")
    assert vm.status == "exited" and vm.exit_code is None
    assert not marker.exists()
    assert store.allocations(vm.id) == {}
    assert store.journal_entries(vm.id) == []


def test_a_reused_pid_is_not_mistaken_for_the_owner() -> None:
    store = Store()
    me = ProcessRef.self()
    impostor = ProcessRef(me.pid, me.start + 1)  # same pid, different start time: a different process
    vm = store.create_vm("old", process=impostor)
    store.update_vm(vm.id, status="running")
    assert [v.name for v in reap_stale(store)] == ["old"]


def test_process_ref_tracks_liveness() -> None:
    child = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(child.pid)
    assert ref.alive()
    ref.terminate(timeout=2)
    child.wait(timeout=5)
    assert not ref.alive()


def test_undo_of_a_process_group_reaches_children_the_leader_leaves_behind(tmp_path: Path) -> None:
    """A VMM that exits on SIGTERM may leave what it spawned (fc-mock's QEMU) running; the journaled group still
    reaches it. (A leader already gone proves nothing about its old group id: see tests/unit/test_host_state.py.)"""
    marker = tmp_path / "child.pid"
    leader = subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! > {marker}; wait"], start_new_session=True)
    while not marker.exists() or not marker.read_text().strip():
        time.sleep(0.01)
    child = ProcessRef.of(int(marker.read_text()))
    store = Store()
    Journal(store, "vm1").record("process", pid=leader.pid, start=ProcessRef.of(leader.pid).start, group=True)
    assert replay(store, "vm1") == []
    assert leader.wait(timeout=5) == -15  # SIGTERM ended it, not the group's SIGKILL
    deadline = time.monotonic() + 5
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not child.alive()


def test_config_updates_keep_the_keys_others_set() -> None:
    # The owner records its timings while `fcvm stop -t` records the grace: neither may erase the other.
    store = Store()
    vm = store.create_vm("cfg", process=ProcessRef.self(), config={"cmd": ["sh"]})
    owner_view = store.require_vm(vm.id).config
    store.update_config(vm.id, stop_grace=2.5)
    store.update_config(vm.id, timings={"t0_wall": 1.0, "healthy": 3.2})
    config = store.require_vm(vm.id).config
    assert owner_view == {"cmd": ["sh"]}
    assert config == {"cmd": ["sh"], "stop_grace": 2.5, "timings": {"t0_wall": 1.0, "healthy": 3.2}}
