"""Host state fcvm keeps and cleans up: process groups after pid reuse, `fcvm ls` after a SIGKILLed owner, the
modes of the state store, `fcvm rm`, and debug logs without the container's environment."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core import paths
from fcvm.core.kinds import VmStatus
from fcvm.core.proc import ProcessRef
from fcvm.run.cleanup import reap_stale
from fcvm.state import Store
from fcvm.state.journal import Journal
from fcvm.vmm.base import Drive, MachineSpec
from fcvm.vmm.firecracker.client import Client
from fcvm.vmm.firecracker.vm import FirecrackerVm
from fcvm_wire.plan import ImageSpec, NetworkSpec, Plan
from tests.support import require, require_tool

SECRET = "hunter2-xyz"


def fcvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fcvm", *args], capture_output=True, text=True, timeout=120)


def running(pid: int) -> bool:
    """Whether any thread of `pid` has yet to exit (a zombie leader may still have running threads)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tids:
        with contextlib.suppress(FileNotFoundError):
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            if state not in (b"Z", b"X"):
                return True
    return False


def group_members(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError):
                fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != b"Z":
                    found.append(int(entry.name))
    return sorted(found)


def dead_owner() -> ProcessRef:
    """A process that owned a VM and was SIGKILLed."""
    owner = subprocess.Popen(["sleep", "600"])
    ref = ProcessRef.of(owner.pid)
    owner.kill()
    owner.wait()
    return ref


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process group: a leader and a member, nothing to do with fcvm."""
    leader = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(leader.pid)) < 2:
        assert time.monotonic() < deadline, "the stranger's member did not start"
        time.sleep(0.01)
    yield leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


# --- process groups after pid reuse ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["gc", "ls"])
def test_a_process_group_that_reuses_a_journaled_pid_survives(stranger: subprocess.Popen[bytes],
                                                              command: str) -> None:
    """A dead VM's VMM pid now leads a stranger's group (after a reboot or pid reuse): its start time differs."""
    members = group_members(stranger.pid)
    store = Store()
    vm = store.create_vm("ghost", process=dead_owner())
    store.update_vm(vm.id, status=VmStatus.RUNNING)
    reused = ProcessRef(stranger.pid, ProcessRef.of(stranger.pid).start - 1)
    Journal(store, vm.id).record("process", pid=reused.pid, start=reused.start, grace=1, group=True)

    result = fcvm(command)

    assert result.returncode == 0, result.stderr
    assert stranger.poll() is None, "the stranger's leader was killed"
    assert group_members(stranger.pid) == members, "a member of the stranger's group was killed"
    ghost = store.require_vm(vm.id)
    assert ghost.status == VmStatus.EXITED and store.journal_entries(vm.id) == []


def test_an_orphaned_journal_never_signals_a_group_its_process_no_longer_leads(
        stranger: subprocess.Popen[bytes]) -> None:
    store = Store()
    reused = ProcessRef(stranger.pid, ProcessRef.of(stranger.pid).start + 7)
    Journal(store, "deadbeef0001").record("process", pid=reused.pid, start=reused.start, group=True)
    assert fcvm("gc").returncode == 0
    assert stranger.poll() is None and len(group_members(stranger.pid)) == 2


# --- `fcvm ls` after a SIGKILLed owner ------------------------------------------------------------------

_SYS_EXIT = {"x86_64": 60, "aarch64": 93}

# Like slirp4netns or QEMU on SIGTERM: the main thread is done at once (the leader shows as a zombie), but
# another thread keeps the process, its sockets and its memory, for a while longer.
_LINGERING = r"""
import ctypes, os, signal, sys, threading, time
def on_term(*_):
    threading.Thread(target=lambda: (time.sleep(1.5), os._exit(0))).start()
    ctypes.CDLL(None).syscall(int(sys.argv[1]), 0)  # exit(2): this thread only
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(1)
"""

# Like fc-mock: a VMM that takes a moment to stop and has spawned a child into its process group.
_SLOW_VMM = r"""
import os, signal, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), os._exit(0)))
print(child.pid, flush=True)
while True:
    time.sleep(1)
"""


def _start(script: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_ls_after_the_owner_is_killed_returns_only_once_nothing_of_the_vm_runs() -> None:
    require(platform.machine() in _SYS_EXIT, f"no exit(2) syscall number for {platform.machine()}")
    owner = subprocess.Popen(["sleep", "600"], start_new_session=True)
    store = Store()
    vm = store.create_vm("doomed", process=ProcessRef.of(owner.pid))
    store.update_vm(vm.id, status=VmStatus.RUNNING)
    journal = Journal(store, vm.id)
    slirp, _ = _start(_LINGERING, str(_SYS_EXIT[platform.machine()]))
    journal.record("process", pid=slirp.pid, start=ProcessRef.of(slirp.pid).start, grace=2, layer="network")
    vmm, child = _start(_SLOW_VMM)
    journal.record("process", pid=vmm.pid, start=ProcessRef.of(vmm.pid).start, grace=5, group=True)
    pids = [slirp.pid, vmm.pid, int(child)]
    try:
        owner.kill()
        owner.wait()
        # Two at once: the one that takes the row over reaps it, the other must not answer before it is done.
        listings = [subprocess.Popen([sys.executable, "-m", "fcvm", "ls", "--json"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(2)]
        still_running: dict[int, list[int]] = {}
        deadline = time.monotonic() + 60
        while len(still_running) < len(listings) and time.monotonic() < deadline:
            for index, listing in enumerate(listings):
                if index not in still_running and listing.poll() is not None:
                    still_running[index] = [pid for pid in pids if running(pid)]
            time.sleep(0.005)
        assert still_running == {0: [], 1: []}, "an `fcvm ls` returned while processes of the VM still ran"
        for listing in listings:
            out, err = listing.communicate()
            assert listing.returncode == 0, err
            assert json.loads(out) == [], "the killed VM is still listed"
        row = store.require_vm(vm.id)
        assert row.status == VmStatus.EXITED and store.journal_entries(vm.id) == []
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in (slirp, vmm):
            proc.wait()


def test_a_vm_with_a_process_that_cannot_be_stopped_stays_stopping_and_nobody_waits_for_it() -> None:
    store = Store()
    vm = store.create_vm("stuck", process=dead_owner())
    store.update_vm(vm.id, status=VmStatus.RUNNING)
    Journal(store, vm.id).record("process", pid="not-a-pid", start=0)  # an entry no attempt can undo
    reap_stale(store)  # in this long-lived process, as a supervisor starting another VM does

    assert store.require_vm(vm.id).status == VmStatus.STOPPING  # not exited: something of it may still run
    # Another `fcvm ls` tries again itself rather than waiting (up to a minute) for this process to finish it.
    listed = subprocess.run([sys.executable, "-m", "fcvm", "ls", "--json"], capture_output=True, text=True,
                            timeout=45)
    assert [(row["name"], row["status"]) for row in json.loads(listed.stdout)] == [("stuck", "stopping")]
    assert "could not undo process" in listed.stderr


# --- the state store and `fcvm rm` ------------------------------------------------------------------------


def test_the_data_dir_and_the_state_store_are_private(isolated_data_dir: Path) -> None:
    shutil.rmtree(isolated_data_dir)
    store = Store()
    vm = store.create_vm("private")  # the WAL and its index exist while a connection is open
    data = paths.data_dir()
    assert stat.S_IMODE(data.stat().st_mode) == 0o711
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    store.close()

    # A data dir and store made by an older fcvm are tightened on first use.
    data.chmod(0o755)
    (data / "state.db").chmod(0o644)
    Store().delete_vm(vm.id)
    assert stat.S_IMODE(data.stat().st_mode) == 0o711
    assert stat.S_IMODE((data / "state.db").stat().st_mode) == 0o600


def test_opening_the_store_again_in_one_process_keeps_the_first_connection_safe() -> None:
    """Making the store private must not close a descriptor of it: that drops the process's sqlite locks, and
    another process's last close then deletes the WAL from under the first connection (a disk I/O error)."""
    first = Store()
    first.create_vm("first")
    Store()  # e.g. a supervisor thread opening its own
    subprocess.run([sys.executable, "-c", "from fcvm.state import Store; Store().close()"], check=True, timeout=60)
    wal = paths.data_dir() / "state.db-wal"
    assert wal.exists(), "another process saw no connection left and removed the WAL"
    first.create_vm("second")
    assert [vm.name for vm in first.list_vms()] == ["first", "second"]


def test_rm_removes_the_vms_logs_and_files() -> None:
    store = Store()
    vm = store.create_vm("done")
    store.update_vm(vm.id, status=VmStatus.EXITED, exit_code=0)
    logs = paths.ensure_dir(paths.vm_logs_dir(vm.id), 0o700)
    (logs / "container.log").write_text("the container's output\n")
    (logs / "console.log").write_text("the guest's console\n")
    workdir = paths.ensure_dir(paths.vm_dir(vm.id), 0o700)
    assert stat.S_IMODE(logs.parent.stat().st_mode) == 0o711  # logs/ itself cannot be listed by others

    result = fcvm("rm", "done")

    assert result.returncode == 0, result.stderr
    assert not logs.exists() and not workdir.exists()
    assert store.get_vm(vm.id) is None


# --- debug logs ---------------------------------------------------------------------------------------------


def test_debug_logs_never_show_the_containers_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture,
                                                          sleeping_fc_mock: Path) -> None:
    """Boot through fc-mock at debug level, fcvm's and fc-mock's, with the plan (and its env) in MMDS."""
    require_tool("unshare")
    monkeypatch.setenv("FCVM_LOG", "debug")
    kernel, root = tmp_path / "vmlinux", tmp_path / "root.ext4"
    kernel.write_bytes(b"\x7fELF")
    root.write_bytes(b"\0" * 4096)
    # A network namespace of its own: fc-mock serves the guest's MMDS on the TAP (here `lo`) of its namespace.
    spec = MachineSpec(name="web", workdir=tmp_path / "vm", kernel=kernel, initrd=None, boot_args="console=ttyS0",
                       vcpus=1, mem_mib=128, drives=[Drive("root", root, root=True)], tap="lo",
                       guest_mac="06:00:ac:1e:00:02", enter_argv=["unshare", "--user", "--map-root-user", "--net"])
    plan = Plan(name="web", image=ImageSpec(ref="localhost/web"),
                network=NetworkSpec(address="172.30.0.2", prefix=30, gateway="172.30.0.1", mac="06:00:ac:1e:00:02"),
                cmd=["sh", "-c", "echo $SECRET"], env={"SECRET": SECRET})
    caplog.set_level(logging.DEBUG, logger="fcvm")
    vm = FirecrackerVm(spec, binary=sleeping_fc_mock, mmds=json.loads(plan.to_json()), log_level="Debug")
    vm.start()
    try:
        with Client(vm.api_socket) as client:
            assert client.get("/mmds")["env"] == {"SECRET": SECRET}  # it did go through the logged requests
    finally:
        vm.stop(timeout=10)
    logged = caplog.text + spec.console_log.read_text()
    assert "PUT /mmds" in logged and "PUT /boot-source" in logged  # the requests were logged, at debug level
    assert SECRET not in logged
