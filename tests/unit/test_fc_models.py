"""Every request body the Firecracker client can build is valid against the official v1.16.1 spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fcvm.core.errors import FcvmError
from fcvm.vmm.base import Drive, MachineSpec, MemBackend, RestoreSpec
from fcvm.vmm.firecracker import models as m
from fcvm.vmm.firecracker.vm import FirecrackerVm
from fcvm_standins.fc_mock.spec import Spec
from tests.support import require

SPEC_PATH = Path(__file__).resolve().parents[2].parent / "shared/firecracker/firecracker-v1.16.1.yaml"


@pytest.fixture(scope="module")
def spec() -> Spec:
    require(SPEC_PATH.is_file(), f"the official Firecracker spec is missing at {SPEC_PATH}")
    return Spec(SPEC_PATH)


def assert_valid(spec: Spec, method: str, path: str, body: m.Model | dict[str, Any]) -> None:
    route, _params, _known = spec.match(method, path)
    assert route is not None, f"{method} {path} is not in the spec"
    assert route.body is not None, f"{method} {path} takes no body"
    payload = body.body((1, 16)) if isinstance(body, m.Model) else body
    if isinstance(body, m.Model):
        assert route.body == body.definition, f"{type(body).__name__} sent to {method} {path}"
    assert spec.errors(route.body, payload) == [], payload


def full_machine(tmp_path: Path) -> MachineSpec:
    return MachineSpec(
        name="web-1",
        workdir=tmp_path,
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        boot_args="console=ttyS0 panic=1",
        vcpus=2,
        mem_mib=1024,
        drives=[Drive("root", tmp_path / "root.ext4", root=True), Drive("image", tmp_path / "img", read_only=True)],
        tap="tap0",
        guest_mac="06:00:ac:10:00:02",
        vsock_uds=tmp_path / "v.sock",
        guest_cid=3,
    )


def test_every_boot_request_validates(spec: Spec, tmp_path: Path) -> None:
    vm = FirecrackerVm(full_machine(tmp_path), binary=Path("/bin/false"), mmds={"plan": {"version": 1}})
    requests = vm.boot_requests()
    paths = [path for _method, path, _body in requests]
    assert paths == ["/boot-source", "/machine-config", "/drives/root", "/drives/image",
                     "/network-interfaces/eth0", "/vsock", "/mmds/config", "/mmds", "/actions"]
    for method, path, body in requests:
        assert_valid(spec, method, path, body)


@pytest.mark.parametrize("backend", [MemBackend.FILE, MemBackend.UFFD])
def test_every_restore_request_validates(spec: Spec, tmp_path: Path, backend: MemBackend) -> None:
    machine = full_machine(tmp_path)
    restore = RestoreSpec(state=tmp_path / "snap" / "state", memory=tmp_path / "snap" / "memory", backend=backend,
                          uffd_socket=tmp_path / "snap" / "uffd.sock", vmm_version="1.16.1")
    requests = FirecrackerVm(machine, binary=Path("/bin/false"), mmds=None).restore_requests(restore)
    assert [(method, path) for method, path, _body in requests] == [
        ("PUT", "/snapshot/load"), ("PATCH", "/drives/root"), ("PATCH", "/drives/image"), ("PATCH", "/vm")]
    for method, path, body in requests:
        assert_valid(spec, method, path, body)
    load = requests[0][2]
    assert isinstance(load, m.Model)
    sent = load.body((1, 16))
    expected_memory = str(restore.uffd_socket if backend == MemBackend.UFFD else restore.memory)
    assert sent["mem_backend"] == {"backend_type": str(backend), "backend_path": expected_memory}
    assert sent["resume_vm"] is False  # the drives move to the clone's files before the guest runs
    assert sent["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": "tap0"}]
    assert sent["vsock_override"] == {"uds_path": str(tmp_path / "v.sock")}
    assert [body.body((1, 16)) for _m, _p, body in requests[1:3] if isinstance(body, m.Model)] == [
        {"drive_id": "root", "path_on_host": str(tmp_path / "root.ext4")},
        {"drive_id": "image", "path_on_host": str(tmp_path / "img")}]
    with pytest.raises(m.UnsupportedFieldError, match="vsock_override"):  # no override before 1.16: refused
        load.body((1, 15))


def test_minimal_boot_requests_validate(spec: Spec, tmp_path: Path) -> None:
    machine = MachineSpec(name="m", workdir=tmp_path, kernel=tmp_path / "k", initrd=None, boot_args="")
    for method, path, body in FirecrackerVm(machine, binary=Path("/bin/false"), mmds=None).boot_requests():
        assert_valid(spec, method, path, body)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/vm", m.Vm("Paused")),
        ("PATCH", "/vm", m.Vm("Resumed")),
        ("PUT", "/actions", m.InstanceActionInfo("SendCtrlAltDel")),
        ("PUT", "/actions", m.InstanceActionInfo("FlushMetrics")),
        ("PUT", "/logger", m.Logger(log_path="/tmp/fc.log", level="Debug", show_level=True, show_log_origin=False)),
        ("PUT", "/metrics", m.Metrics("/tmp/metrics.json")),
        ("PUT", "/machine-config", m.MachineConfiguration(32, 2048, smt=True, track_dirty_pages=True,
                                                          huge_pages="2M")),
        ("PUT", "/drives/data_1", m.Drive("data_1", False, "/d", True, "Writeback", "Async",
                                          m.RateLimiter(m.TokenBucket(1 << 20, 100, 0),
                                                        m.TokenBucket(100, 1000)))),
        ("PATCH", "/drives/root", m.PartialDrive("root", "/new/path")),
        ("PUT", "/network-interfaces/eth0", m.NetworkInterface("eth0", "tap0", "06:00:00:00:00:01",
                                                               m.RateLimiter(ops=m.TokenBucket(10, 10)))),
        ("PUT", "/mmds/config", m.MmdsConfig(["eth0"])),
        ("PUT", "/snapshot/create", m.SnapshotCreateParams("/s/vm.snap", "/s/vm.mem", "Full")),
        ("PUT", "/snapshot/create", m.SnapshotCreateParams("/s/vm.snap", "/s/vm.mem", "Diff")),
        ("PUT", "/snapshot/load", m.SnapshotLoadParams(
            "/s/vm.snap", m.MemoryBackend("Uffd", "/s/uffd.sock"), track_dirty_pages=False, resume_vm=False,
            network_overrides=[m.NetworkOverride("eth0", "tap-clone1")],
            vsock_override=m.VsockOverride("/run/clone1/v.sock"), clock_realtime=True)),
        ("PUT", "/snapshot/load", m.SnapshotLoadParams("/s/vm.snap", m.MemoryBackend("File", "/s/vm.mem"))),
    ],
)
def test_optional_bodies_validate(spec: Spec, method: str, path: str, body: m.Model) -> None:
    assert_valid(spec, method, path, body)


def test_none_fields_are_not_sent() -> None:
    assert m.BootSource("/k").body() == {"kernel_image_path": "/k"}
    assert m.Drive("root", True, "/r").body() == {"drive_id": "root", "is_root_device": True, "path_on_host": "/r"}


def test_validator_rejects_what_firecracker_rejects(spec: Spec) -> None:
    """The closed schemas are what make the checks above meaningful."""
    assert spec.errors("BootSource", {"kernel_image_path": "/k", "kernel": "/k"})
    assert spec.errors("MachineConfiguration", {"vcpu_count": "2", "mem_size_mib": 128})
    assert spec.errors("MachineConfiguration", {"vcpu_count": 33, "mem_size_mib": 128})
    assert spec.errors("Drive", {"drive_id": "root"})
    assert spec.errors("Vm", {"state": "Stopped"})
    assert spec.errors("SnapshotLoadParams", {"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                                                                                   "backend_path": "/m", "x": 1}})


def test_version_gating_drops_or_refuses_newer_fields() -> None:
    load = m.SnapshotLoadParams("/s", m.MemoryBackend("File", "/m"),
                                network_overrides=[m.NetworkOverride("eth0", "tap1")], clock_realtime=True)
    assert "clock_realtime" in load.body((1, 16))
    at_12 = load.body((1, 12))
    assert "clock_realtime" not in at_12
    assert at_12["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": "tap1"}]
    load.vsock_override = m.VsockOverride("/v.sock")
    with pytest.raises(m.UnsupportedFieldError, match=r"vsock_override needs Firecracker 1\.16"):
        load.body((1, 15))


@pytest.mark.parametrize("version", ["1.12.0", "1.14.2", "1.16.1", "v1.16.0-dev"])
def test_supported_versions(version: str) -> None:
    assert (1, 12) <= m.check_supported(version) <= (1, 16)


@pytest.mark.parametrize("version", ["1.11.1", "1.17.0", "2.0.0", "0.25.0"])
def test_unsupported_versions_are_a_clear_error(version: str) -> None:
    with pytest.raises(FcvmError, match=rf"Firecracker {version} is not supported: fcvm supports 1\.12 to 1\.16"):
        m.check_supported(version)


@pytest.mark.parametrize("bad", ["root-fs", "", "a b", "root/x", "é"])
def test_ids_are_checked_before_sending(bad: str) -> None:
    with pytest.raises(FcvmError, match="drive_id"):
        m.Drive(bad, True, "/r")
    with pytest.raises(FcvmError, match="iface_id"):
        m.NetworkInterface(bad, "tap0")
