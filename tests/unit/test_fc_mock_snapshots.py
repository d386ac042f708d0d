"""fc-mock's snapshots against Firecracker's rules: create only when paused and Full only, load only in a fresh
process, the baked drive paths, the overrides and the memory backends; and fcvm's client driving a load through
the `fcvm-fc-mock` executable. A fake backend stands in for QEMU (the vm tier boots the real thing)."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fcvm.core.errors import FcvmError
from fcvm.vmm.base import Drive, MachineSpec, MemBackend, RestoreSpec
from fcvm.vmm.firecracker.client import FirecrackerApiError
from fcvm.vmm.firecracker.vm import FirecrackerVm
from fcvm_standins.fc_mock import api as fc_api
from fcvm_standins.fc_mock.spec import Spec
from tests.fc_mock_support import SPEC_PATH
from tests.support import require
from tests.unit.test_fc_mock_api import FAKE_STREAM, Mock

MEM_MIB = 256


@pytest.fixture(scope="module")
def spec() -> Spec:
    require(SPEC_PATH.is_file(), f"the official Firecracker spec is missing at {SPEC_PATH}")
    return Spec(SPEC_PATH)


def new_mock(spec: Spec, directory: Path) -> Mock:
    directory.mkdir()
    mock = Mock(spec, directory)
    mock.api.tap_exists = lambda name: name in ("tap0", "tap1")
    return mock


@pytest.fixture
def source(spec: Spec, tmp_path: Path) -> Iterator[Mock]:
    """A booted microVM with a root drive, a read-only data drive, a TAP, a vsock and MMDS."""
    mock = new_mock(spec, tmp_path / "source")
    mock.configure()
    data = mock.tmp / "data.img"
    data.write_bytes(b"\0" * 512)
    mock.ok("PUT", "/drives/data", {"drive_id": "data", "is_root_device": False, "path_on_host": str(data),
                                    "is_read_only": True})
    mock.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                               "guest_mac": "06:00:ac:10:00:02"})
    mock.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(mock.tmp / "v.sock")})
    mock.ok("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"})
    mock.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    yield mock
    mock.api.shutdown(0, force=True)


@pytest.fixture
def clone(spec: Spec, tmp_path: Path) -> Iterator[Mock]:
    """A fresh fc-mock process, as a clone gets."""
    mock = new_mock(spec, tmp_path / "clone")
    yield mock
    mock.api.shutdown(0, force=True)


def take_snapshot(source: Mock) -> tuple[Path, Path]:
    state, memory = source.tmp / "snap.state", source.tmp / "snap.mem"
    source.ok("PATCH", "/vm", {"state": "Paused"})
    source.ok("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(state),
                                          "mem_file_path": str(memory)})
    return state, memory


def load_body(state: Path, memory: Path, clone: Mock, **extra: Any) -> dict[str, Any]:
    return {"snapshot_path": str(state), "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            "resume_vm": False, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
            "vsock_override": {"uds_path": str(clone.tmp / "v.sock")}, **extra}


# -- create ----------------------------------------------------------------------------------------


def test_create_writes_the_machine_then_the_stream_and_leaves_the_vm_paused(source: Mock) -> None:
    state, memory = take_snapshot(source)
    header_line, _, stream = state.read_bytes().partition(b"\n")
    assert stream == FAKE_STREAM
    header = json.loads(header_line)
    assert header["format"] == "fc-mock-snapshot" and header["qemu_version"] == "fake-qemu 7.2"
    assert header["firecracker_version"] == "1.16.1"
    vm = header["vm"]
    assert vm["machine-config"]["vcpu_count"] == 2 and vm["machine-config"]["mem_size_mib"] == MEM_MIB
    assert [(d["drive_id"], d["path_on_host"], d.get("is_read_only")) for d in vm["drives"]] == [
        ("root", str(source.rootfs), False), ("data", str(source.tmp / "data.img"), True)]
    assert vm["network-interfaces"] == [{"iface_id": "eth0", "host_dev_name": "tap0",
                                         "guest_mac": "06:00:ac:10:00:02"}]
    assert vm["vsock"] == {"guest_cid": 3, "uds_path": str(source.tmp / "v.sock")}
    assert memory.stat().st_size == MEM_MIB << 20
    assert source.ok("GET", "/")["state"] == "Paused"
    assert source.backends[-1].calls == ["start", "pause", "save"]


def test_create_only_when_paused(source: Mock) -> None:
    body = {"snapshot_path": str(source.tmp / "s"), "mem_file_path": str(source.tmp / "m")}
    assert "not paused" in source.fault("PUT", "/snapshot/create", body)
    source.ok("PATCH", "/vm", {"state": "Paused"})
    source.ok("PATCH", "/vm", {"state": "Resumed"})
    assert "not paused" in source.fault("PUT", "/snapshot/create", body)
    assert not (source.tmp / "s").exists() and "save" not in source.backends[-1].calls


def test_diff_snapshots_are_a_clear_400(spec: Spec, tmp_path: Path) -> None:
    mock = new_mock(spec, tmp_path / "vm")
    mock.configure()
    mock.ok("PATCH", "/machine-config", {"track_dirty_pages": True})
    mock.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    mock.ok("PATCH", "/vm", {"state": "Paused"})
    message = mock.fault("PUT", "/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": str(tmp_path / "s"),
                                                     "mem_file_path": str(tmp_path / "m")})
    assert "Full snapshots only" in message
    assert not (tmp_path / "s").exists()
    mock.api.shutdown(0, force=True)


# -- load ------------------------------------------------------------------------------------------


def test_load_patch_drives_resume_rebuilds_the_clone(source: Mock, clone: Mock) -> None:
    state, memory = take_snapshot(source)
    own_disk = clone.tmp / "root.img"
    own_disk.write_bytes(b"\0" * 4096)
    clone.ok("PUT", "/snapshot/load", load_body(state, memory, clone))
    assert clone.ok("GET", "/")["state"] == "Paused" and clone.backends == []  # nothing runs before the resume
    clone.ok("PATCH", "/drives/root", {"drive_id": "root", "path_on_host": str(own_disk)})
    clone.ok("PATCH", "/vm", {"state": "Resumed"})
    assert clone.ok("GET", "/")["state"] == "Running"
    (backend,) = clone.backends
    machine = backend.spec
    assert backend.calls == ["start"]
    assert machine.restore == RestoreSpec(state=state, memory=memory, backend=MemBackend.FILE,
                                          state_offset=len(state.read_bytes()) - len(FAKE_STREAM),
                                          vmm_version="fake-qemu 7.2")
    assert [(d.drive_id, d.path, d.read_only, d.root) for d in machine.drives] == [
        ("root", own_disk, False, True), ("data", source.tmp / "data.img", True, False)]
    assert machine.tap == "tap1" and machine.guest_mac == "06:00:ac:10:00:02"
    assert machine.vsock_uds == clone.tmp / "v.sock" and machine.guest_cid == 3
    assert (machine.vcpus, machine.mem_mib, machine.mem_file) == (2, MEM_MIB, None)
    config = clone.ok("GET", "/vm/config")  # what Firecracker reports: the overrides and the patched drive
    assert config["drives"][0]["path_on_host"] == str(own_disk)
    assert config["network-interfaces"][0]["host_dev_name"] == "tap1"
    assert config["vsock"]["uds_path"] == str(clone.tmp / "v.sock")


def test_load_with_resume_vm_runs_at_once(source: Mock, clone: Mock) -> None:
    state, memory = take_snapshot(source)
    clone.ok("PUT", "/snapshot/load", load_body(state, memory, clone, resume_vm=True))
    assert clone.ok("GET", "/")["state"] == "Running"
    assert clone.backends[-1].spec.restore is not None


def test_load_only_in_a_fresh_process(source: Mock, clone: Mock) -> None:
    state, memory = take_snapshot(source)
    body = load_body(state, memory, clone)
    assert source.fault("PUT", "/snapshot/load", body) == fc_api.PRE_BOOT_ONLY  # a started microVM
    clone.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": MEM_MIB})
    assert "not allowed after configuring boot-specific resources" in clone.fault("PUT", "/snapshot/load", body)
    assert clone.backends == []


def test_a_second_load_and_boot_config_after_a_load_are_refused(source: Mock, clone: Mock) -> None:
    state, memory = take_snapshot(source)
    body = load_body(state, memory, clone)
    clone.ok("PUT", "/snapshot/load", body)
    assert clone.fault("PUT", "/snapshot/load", body) == fc_api.PRE_BOOT_ONLY
    assert clone.fault("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}) == fc_api.PRE_BOOT_ONLY
    assert clone.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == fc_api.PRE_BOOT_ONLY


def test_a_missing_baked_drive_fails_the_load(source: Mock, clone: Mock) -> None:
    state, memory = take_snapshot(source)
    source.rootfs.unlink()  # the source's disk is gone: Firecracker cannot reopen it
    message = clone.fault("PUT", "/snapshot/load", load_body(state, memory, clone))
    assert "Cannot restore the block device root" in message and str(source.rootfs) in message
    assert clone.ok("GET", "/")["state"] == "Not started"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"network_overrides": [{"iface_id": "eth1", "host_dev_name": "tap1"}]}, "no network interface"),
        ({"network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}, "Invalid TAP name: tap9"),
        ({"vsock_override": None}, "Address in use"),  # the source's socket path, baked in, is taken
        ({"clock_realtime": True}, "clock_realtime"),
        ({"mem_backend": {"backend_type": "Uffd", "backend_path": "/no/such.sock"}}, "UFFD page server"),
        ({"mem_backend": {"backend_type": "File", "backend_path": "/no/such.mem"}}, "Cannot open the memory file"),
    ],
)
def test_load_refuses_what_firecracker_refuses(source: Mock, clone: Mock, change: dict[str, Any],
                                               expected: str) -> None:
    state, memory = take_snapshot(source)
    (source.tmp / "v.sock").touch()  # as the source's vsock listener is
    body = {k: v for k, v in {**load_body(state, memory, clone), **change}.items() if v is not None}
    assert expected in clone.fault("PUT", "/snapshot/load", body)
    assert clone.backends == []


def test_load_refuses_a_damaged_snapshot(source: Mock, clone: Mock) -> None:
    state, memory = take_snapshot(source)
    with memory.open("r+b") as ram:
        ram.truncate(4096)
    assert "has 4096 bytes" in clone.fault("PUT", "/snapshot/load", load_body(state, memory, clone))
    not_ours = clone.tmp / "plain"
    not_ours.write_bytes(b"QEVM stream without a header")
    assert "not an fc-mock snapshot" in clone.fault("PUT", "/snapshot/load", load_body(not_ours, memory, clone))
    header, _, stream = state.read_bytes().partition(b"\n")
    record = json.loads(header)
    record["vm"]["machine-config"]["vcpu_count"] = "two"
    state.write_bytes(json.dumps(record).encode() + b"\n" + stream)
    assert "configuration is damaged" in clone.fault("PUT", "/snapshot/load", load_body(state, memory, clone))
    record["vm"]["machine-config"]["vcpu_count"] = 2
    record["firecracker_version"] = "1.15.0"
    state.write_bytes(json.dumps(record).encode() + b"\n" + stream)
    assert "taken by Firecracker 1.15.0" in clone.fault("PUT", "/snapshot/load", load_body(state, memory, clone))


def test_uffd_load_hands_qemu_the_page_server_and_the_preload_library(
        source: Mock, clone: Mock, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcvm.uffd import preload

    state, memory = take_snapshot(source)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server_path = clone.tmp / "uffd.sock"
    server.bind(str(server_path))
    server.listen()
    library = clone.tmp / "libfcvm-uffd-test.so"
    monkeypatch.setattr(preload, "find", lambda dirs: library)
    body = load_body(state, memory, clone, mem_backend={"backend_type": "Uffd", "backend_path": str(server_path)})
    clone.ok("PUT", "/snapshot/load", body)
    clone.ok("PATCH", "/vm", {"state": "Resumed"})
    restore = clone.backends[-1].spec.restore
    assert restore is not None and restore.backend == MemBackend.UFFD
    assert (restore.uffd_socket, restore.preload) == (server_path, library)
    monkeypatch.setattr(preload, "find", lambda dirs: None)
    fresh = new_mock(clone.api.spec, clone.tmp / "again")
    body["vsock_override"] = {"uds_path": str(fresh.tmp / "v.sock")}
    assert "preload library" in fresh.fault("PUT", "/snapshot/load", body)
    server.close()


def test_restored_vm_rules(source: Mock, clone: Mock) -> None:
    state, memory = take_snapshot(source)
    clone.ok("PUT", "/snapshot/load", load_body(state, memory, clone))
    assert "No such file" in clone.fault("PATCH", "/drives/root", {"drive_id": "root", "path_on_host": "/no/such"})
    assert "does not exist" in clone.fault("PATCH", "/drives/nope", {"drive_id": "nope", "path_on_host": "/x"})
    again = {"snapshot_path": str(clone.tmp / "s"), "mem_file_path": str(clone.tmp / "m")}
    assert "restored from a snapshot" in clone.fault("PUT", "/snapshot/create", again)
    clone.ok("PATCH", "/vm", {"state": "Resumed"})
    assert "only between snapshot load and resume" in clone.fault("PATCH", "/drives/root", {
        "drive_id": "root", "path_on_host": str(source.rootfs)})
    clone.ok("PATCH", "/vm", {"state": "Paused"})
    assert "restored from a snapshot" in clone.fault("PUT", "/snapshot/create", again)
    assert clone.backends[-1].calls == ["start", "pause"]


# -- fcvm's client through the fcvm-fc-mock executable ---------------------------------------------

BACKEND = '''
import subprocess
from pathlib import Path
from fcvm.core import log
from fcvm.core.proc import ProcessRef

class B:
    def __init__(self, spec): self.spec = spec
    @property
    def process(self): return ProcessRef.of(self.p.pid)
    def start(self):
        self.p = subprocess.Popen(["sleep", "60"])
        restore, say = self.spec.restore, log.get("vm." + self.spec.name).info
        if restore is not None:
            say("restore %s %s offset=%d" % (restore.backend, restore.memory, restore.state_offset))
        for d in self.spec.drives:
            say("drive %s %s" % (d.drive_id, d.path))
        say("tap %s vsock %s" % (self.spec.tap, self.spec.vsock_uds))
    def wait(self, timeout=None): return self.p.wait(timeout)
    def pause(self): pass
    def resume(self): pass
    def stop(self, timeout=10.0):
        self.p.terminate(); self.p.wait()
    def vmm_version(self): return "fake-qemu 7.2"
    def save(self, state, memory, header):
        state.write_bytes(header + b"stream")
        with open(memory, "wb") as f: f.truncate(self.spec.mem_mib << 20)
'''


def _machine(tmp_path: Path, name: str, root: Path) -> MachineSpec:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    work = tmp_path / name
    return MachineSpec(name=name, workdir=work, kernel=kernel, initrd=None, boot_args="console=ttyS0", vcpus=1,
                       mem_mib=128, drives=[Drive("rootfs", root, root=True)], vsock_uds=work / "v.sock")


def test_fcvm_clones_through_fc_mock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's load sequence (load paused, patch drives, resume) is what fc-mock, and Firecracker, accept."""
    from fcvm.vmm.firecracker import models as m
    from fcvm.vmm.firecracker.client import Client

    binary = shutil.which("fcvm-fc-mock")
    require(binary is not None, "fcvm-fc-mock is not installed (pip install -e .)")
    require(SPEC_PATH.is_file(), f"the official Firecracker spec is missing at {SPEC_PATH}")
    assert binary is not None
    (tmp_path / "backend.py").write_text(BACKEND)
    monkeypatch.setenv("FCVM_FC_MOCK_BACKEND", f"{tmp_path / 'backend.py'}:B")
    monkeypatch.setenv("FCVM_FC_SPEC", str(SPEC_PATH))
    source_disk, clone_disk = tmp_path / "source.ext4", tmp_path / "clone.ext4"
    for disk in (source_disk, clone_disk):
        disk.write_bytes(b"\0" * 4096)
    source = FirecrackerVm(_machine(tmp_path, "src", source_disk), binary=Path(binary), mmds=None)
    source.start()
    state, memory = tmp_path / "state", tmp_path / "memory"
    try:
        with Client(source.api_socket) as client:
            client.negotiate()
            client.patch(m.VM, m.Vm("Paused"))
            client.put(m.SNAPSHOT_CREATE, m.SnapshotCreateParams(
                snapshot_path=str(state), mem_file_path=str(memory), snapshot_type="Full"))
        restore = RestoreSpec(state=state, memory=memory, vmm_version="1.16.1")
        spec = _machine(tmp_path, "clone", clone_disk)
        spec.restore = restore
        clone = FirecrackerVm(spec, binary=Path(binary), mmds=None)
        clone.start()
        clone.stop(timeout=10)
        console = spec.console_log.read_text()
        offset = len(state.read_bytes()) - len(b"stream")
        assert f"restore File {memory} offset={offset}" in console
        assert f"drive rootfs {clone_disk}" in console and str(source_disk) not in console
        assert f"vsock {spec.vsock_uds}" in console

        older = _machine(tmp_path, "older", clone_disk)
        older.restore = RestoreSpec(state=state, memory=memory, vmm_version="1.15.2")
        with pytest.raises(FcvmError, match=r"taken by Firecracker 1\.15\.2"):
            FirecrackerVm(older, binary=Path(binary), mmds=None).start()
        source_disk.unlink()  # a real Firecracker reopens the source's drive on load
        gone = _machine(tmp_path, "gone", clone_disk)
        gone.restore = restore
        with pytest.raises(FirecrackerApiError, match="Cannot restore the block device rootfs"):
            FirecrackerVm(gone, binary=Path(binary), mmds=None).start()
    finally:
        source.stop(timeout=10)
