"""fc-mock conformance: the API rules Firecracker enforces, checked against fc-mock.

Most tests drive `FcMock.handle` directly with a fake backend (no QEMU); a few go through the HTTP
server on a Unix socket and the `fcvm-fc-mock` executable.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fcvm.core.proc import ProcessRef
from fcvm.vmm.base import MachineSpec
from fcvm.vmm.firecracker.binary import describe_binary, identify
from fcvm_standins.fc_mock import api as fc_api
from fcvm_standins.fc_mock.api import FcMock
from fcvm_standins.fc_mock.mmds import TOKEN_HEADER, TOKEN_TTL_HEADER, MmdsServer, merge_patch
from fcvm_standins.fc_mock.server import ApiServer
from fcvm_standins.fc_mock.spec import Spec
from tests.fc_mock_support import fc_mock_binary, official_spec

FAKE_STREAM = b"QEVM\0\0\0\3 device state"


class FakeBackend:
    """Records calls instead of booting QEMU."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.calls: list[str] = []
        self.exited = threading.Event()

    @property
    def process(self) -> ProcessRef:
        return ProcessRef.self()

    def start(self) -> None:
        self.calls.append("start")

    def wait(self, timeout: float | None = None) -> int | None:
        return 0 if self.exited.wait(timeout) else None

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def stop(self, timeout: float = 10.0) -> None:
        self.calls.append("stop")
        self.exited.set()

    def vmm_version(self) -> str:
        return "fake-qemu 7.2"

    def save(self, state: Path, memory: Path, header: bytes) -> None:
        """What QemuVm writes: the header, then a device-state stream; the RAM as a file of the guest's size."""
        self.calls.append("save")
        state.write_bytes(header + FAKE_STREAM)
        with memory.open("wb") as ram:
            ram.truncate(self.spec.mem_mib << 20)


@pytest.fixture(scope="module")
def spec() -> Spec:
    return Spec(official_spec())


class Mock:
    def __init__(self, spec: Spec, tmp: Path) -> None:
        self.tmp = tmp
        self.backends: list[FakeBackend] = []
        self.exit_codes: list[int] = []
        self.kernel = tmp / "vmlinux"
        self.kernel.write_bytes(b"\x7fELF")
        self.rootfs = tmp / "root.ext4"
        self.rootfs.write_bytes(b"\0" * 4096)
        self.api = FcMock(spec, instance_id="vm1", workdir=tmp / "w", backend_factory=self._backend,
                          on_exit=self.exit_codes.append, tap_exists=lambda name: name == "tap0")

    def _backend(self, spec: MachineSpec) -> FakeBackend:
        backend = FakeBackend(spec)
        self.backends.append(backend)
        return backend

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        response = self.api.handle(method, path, data)
        return response.status, response.body

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.call(method, path, body)
        assert status in (200, 204), answer
        return answer

    def fault(self, method: str, path: str, body: Any = None, status: int = 400) -> str:
        code, answer = self.call(method, path, body)
        assert code == status, answer
        assert set(answer) == {"fault_message"}
        return str(answer["fault_message"])

    def configure(self, *, read_only_root: bool = False) -> None:
        self.ok("PUT", "/boot-source", {"kernel_image_path": str(self.kernel), "boot_args": "console=ttyS0"})
        self.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
        self.ok("PUT", "/drives/root", {"drive_id": "root", "is_root_device": True,
                                        "path_on_host": str(self.rootfs), "is_read_only": read_only_root})

    def boot(self) -> FakeBackend:
        self.configure()
        self.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        return self.backends[-1]


@pytest.fixture
def mock(spec: Spec, tmp_path: Path) -> Iterator[Mock]:
    instance = Mock(spec, tmp_path)
    yield instance
    instance.api.shutdown(0, force=True)


# -- body validation -----------------------------------------------------------------------------


def test_unknown_field_is_rejected_with_fault_message(mock: Mock) -> None:
    message = mock.fault("PUT", "/boot-source", {"kernel_image_path": str(mock.kernel), "kernel_args": "x"})
    assert "unknown field `kernel_args`" in message
    nested = mock.fault("PUT", "/drives/root", {
        "drive_id": "root", "is_root_device": True, "path_on_host": str(mock.rootfs),
        "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 2}},
    })
    assert "unknown field `burst`" in nested


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/machine-config", {"vcpu_count": "2", "mem_size_mib": 256}, "is not of type 'integer'"),
        ("/machine-config", {"vcpu_count": 2.0, "mem_size_mib": 256}, "is not of type 'integer'"),
        ("/machine-config", {"vcpu_count": 0, "mem_size_mib": 256}, "less than the minimum"),
        ("/machine-config", {"vcpu_count": 2}, "'mem_size_mib' is a required property"),
        ("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "1G"}, "is not one of"),
        ("/vsock", {"guest_cid": 2, "uds_path": "/x"}, "less than the minimum"),
        ("/actions", {"action_type": "Reboot"}, "is not one of"),
        ("/drives/root", {"drive_id": "root", "is_root_device": "yes"}, "is not of type 'boolean'"),
    ],
)
def test_wrong_types_missing_fields_and_enums(mock: Mock, path: str, body: Any, expected: str) -> None:
    assert expected in mock.fault("PUT", path, body)


def test_malformed_json_and_unknown_paths(mock: Mock) -> None:
    status, answer = mock.call("PUT", "/boot-source", raw=b"{not json")
    assert status == 400 and "deserializing" in answer["fault_message"]
    assert "Invalid request method and/or path" in mock.fault("GET", "/nope")
    assert "Invalid request method and/or path" in mock.fault("DELETE", "/vm")


def test_ids_must_be_alphanumeric_or_underscore_and_match_the_body(mock: Mock) -> None:
    drive = {"drive_id": "root-fs", "is_root_device": True, "path_on_host": str(mock.rootfs)}
    assert "Invalid ID `root-fs`" in mock.fault("PUT", "/drives/root-fs", drive)
    drive["drive_id"] = "other"
    assert "does not match" in mock.fault("PUT", "/drives/root_fs", drive)
    iface = {"iface_id": "eth1", "host_dev_name": "tap0"}
    assert "does not match" in mock.fault("PUT", "/network-interfaces/eth0", iface)


def test_payload_limit(mock: Mock) -> None:
    big = {"data": "x" * fc_api.MAX_PAYLOAD}
    assert "larger than the limit of 51200" in mock.fault("PUT", "/mmds", big)


# -- semantics Firecracker checks at PUT time -----------------------------------------------------


def test_missing_files_tap_and_second_root(mock: Mock, tmp_path: Path) -> None:
    assert "Cannot open kernel image" in mock.fault("PUT", "/boot-source", {"kernel_image_path": "/no/such"})
    assert "No such file" in mock.fault("PUT", "/drives/root", {
        "drive_id": "root", "is_root_device": True, "path_on_host": "/no/such", "is_read_only": False})
    mock.configure()
    other = tmp_path / "other.img"
    other.write_bytes(b"\0")
    assert "root block device already exists" in mock.fault("PUT", "/drives/data", {
        "drive_id": "data", "is_root_device": True, "path_on_host": str(other), "is_read_only": False})
    assert "Open tap device failed" in mock.fault("PUT", "/network-interfaces/eth0",
                                                  {"iface_id": "eth0", "host_dev_name": "tap9"})
    assert "does not correspond" in mock.fault("PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
    mock.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                               "guest_mac": "06:00:ac:10:00:02"})
    mock.ok("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"})
    assert "not link local" in mock.fault("PUT", "/mmds/config", {"network_interfaces": ["eth0"],
                                                                  "ipv4_address": "10.0.0.1"})
    (tmp_path / "v.sock").touch()
    assert "Address in use" in mock.fault("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})
    assert "SMT" in mock.fault("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 256, "smt": True})


# -- state rules ---------------------------------------------------------------------------------


def test_version_and_instance_info(mock: Mock, spec: Spec) -> None:
    assert mock.ok("GET", "/version") == {"firecracker_version": "1.16.1"}
    info = mock.ok("GET", "/")
    assert info["state"] == "Not started" and info["id"] == "vm1" and info["vmm_version"] == "1.16.1"
    assert spec.errors("InstanceInfo", info) == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m"}),
        ("PATCH", "/drives/root", {"drive_id": "root", "path_on_host": "/x"}),
        ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}),
    ],
)
def test_post_boot_only_before_boot(mock: Mock, method: str, path: str, body: Any) -> None:
    assert mock.fault(method, path, body) == fc_api.POST_BOOT_ONLY


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/boot-source", {"kernel_image_path": "/k"}),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        ("PATCH", "/machine-config", {"vcpu_count": 1}),
        ("PUT", "/drives/data", {"drive_id": "data", "is_root_device": False, "path_on_host": "/d"}),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v"}),
        ("PUT", "/mmds/config", {"network_interfaces": ["eth0"]}),
        ("PUT", "/logger", {"level": "Debug"}),
        ("PUT", "/metrics", {"metrics_path": "/m"}),
        ("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": True}),
        ("PUT", "/entropy", {}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                                                                          "backend_path": "/m"}}),
    ],
)
def test_pre_boot_only_after_boot(mock: Mock, method: str, path: str, body: Any) -> None:
    mock.boot()
    assert mock.fault(method, path, body) == fc_api.PRE_BOOT_ONLY


def test_instance_start_boots_the_configured_machine(mock: Mock) -> None:
    assert "without kernel configuration" in mock.fault("PUT", "/actions", {"action_type": "InstanceStart"})
    backend = mock.boot()
    assert backend.calls == ["start"]
    machine = backend.spec
    assert machine.kernel == mock.kernel
    assert machine.boot_args == "console=ttyS0 root=/dev/vda rw pci=off"
    assert [d.drive_id for d in machine.drives] == ["root"]
    assert machine.vcpus == 2 and machine.mem_mib == 256 and machine.enter_argv == []
    assert mock.ok("GET", "/")["state"] == "Running"


def test_read_only_root_and_root_drive_first(mock: Mock, tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(b"\0")
    mock.ok("PUT", "/drives/image", {"drive_id": "image", "is_root_device": False, "path_on_host": str(image),
                                     "is_read_only": True})
    mock.configure(read_only_root=True)
    mock.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    machine = mock.backends[-1].spec
    assert machine.boot_args.endswith("root=/dev/vda ro pci=off")
    assert [(d.drive_id, d.root, d.read_only) for d in machine.drives] == [("root", True, True),
                                                                          ("image", False, True)]


def test_pause_resume_and_snapshot_create_needs_paused(mock: Mock) -> None:
    backend = mock.boot()
    snapshot = {"snapshot_path": str(mock.tmp / "s"), "mem_file_path": str(mock.tmp / "m")}
    assert "not paused" in mock.fault("PUT", "/snapshot/create", snapshot)
    mock.ok("PATCH", "/vm", {"state": "Paused"})
    assert mock.ok("GET", "/")["state"] == "Paused"
    mock.ok("PUT", "/snapshot/create", snapshot)
    assert mock.ok("GET", "/")["state"] == "Paused"  # Firecracker leaves the VM paused after a snapshot
    mock.ok("PATCH", "/vm", {"state": "Resumed"})
    assert backend.calls == ["start", "pause", "save", "resume"]


def test_snapshot_load_only_in_a_fresh_process(mock: Mock, tmp_path: Path) -> None:
    load = {"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}
    mock.ok("PUT", "/logger", {"level": "Info"})
    mock.ok("PUT", "/metrics", {"metrics_path": str(tmp_path / "metrics")})
    mock.ok("PUT", "/mmds", {"a": 1})
    fresh = mock.fault("PUT", "/snapshot/load", load)
    assert "not allowed" not in fresh and "cannot open the snapshot file /s" in fresh  # passed the state rules
    mock.ok("PUT", "/boot-source", {"kernel_image_path": str(mock.kernel)})
    assert "not allowed after configuring boot-specific resources" in mock.fault("PUT", "/snapshot/load", load)


def test_send_ctrl_alt_del_stops_the_guest_and_exits(mock: Mock) -> None:
    backend = mock.boot()
    mock.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert backend.exited.wait(5)
    deadline = time.monotonic() + 5
    while not mock.exit_codes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mock.exit_codes == [0]


def test_vm_config_reflects_the_configuration(mock: Mock, spec: Spec) -> None:
    mock.configure()
    config = mock.ok("GET", "/vm/config")
    assert spec.errors("FullVmConfiguration", config) == []
    assert config["drives"][0]["drive_id"] == "root"
    assert config["machine-config"]["vcpu_count"] == 2
    assert mock.ok("GET", "/machine-config")["mem_size_mib"] == 256


# -- MMDS ----------------------------------------------------------------------------------------


def test_mmds_put_patch_get_merge(mock: Mock) -> None:
    assert "not initialized" in mock.fault("PATCH", "/mmds", {"a": 1})
    mock.ok("PUT", "/mmds", {"latest": {"meta-data": {"id": "i-1", "tags": {"a": "1", "b": "2"}}}, "keep": 1})
    mock.ok("PATCH", "/mmds", {"latest": {"meta-data": {"id": "i-2", "tags": {"a": None}}}, "new": [1, 2]})
    assert mock.ok("GET", "/mmds") == {"latest": {"meta-data": {"id": "i-2", "tags": {"b": "2"}}},
                                       "keep": 1, "new": [1, 2]}
    mock.ok("PUT", "/mmds", {"replaced": True})
    assert mock.ok("GET", "/mmds") == {"replaced": True}


def test_mmds_store_full_is_413(spec: Spec, tmp_path: Path) -> None:
    api = FcMock(spec, instance_id="x", workdir=tmp_path, backend_factory=FakeBackend, mmds_size_limit=100)
    api.handle("PUT", "/mmds", b'{"a": 1}')
    response = api.handle("PATCH", "/mmds", json.dumps({"b": "x" * 200}).encode())
    assert response.status == 413 and "full" in response.body["fault_message"]


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7396, appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_rfc7396(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(target, patch) == result


def test_guest_mmds_v2_tokens() -> None:
    store = {"latest": {"meta-data": {"plan": {"image": "web"}, "name": "vm1"}}}
    server = MmdsServer("127.0.0.1", 0, lambda: store, "V2")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as guest:
            assert guest.get("/latest/meta-data/name").status_code == 401
            assert guest.get("/", headers={TOKEN_HEADER: "forged"}).status_code == 401
            assert guest.put("/latest/api/token", headers={TOKEN_TTL_HEADER: "0"}).status_code == 400
            assert guest.put("/latest/api/token").status_code == 400
            token = guest.put("/latest/api/token", headers={TOKEN_TTL_HEADER: "60"}).text
            auth = {TOKEN_HEADER: token}
            answer = guest.get("/latest/meta-data", headers={**auth, "Accept": "application/json"})
            assert answer.status_code == 200 and answer.json() == store["latest"]["meta-data"]
            assert guest.get("/latest/meta-data", headers=auth).text == "plan/\nname"
            assert guest.get("/latest/meta-data/name", headers=auth).text == "vm1"
            assert guest.get("/latest/nothing", headers=auth).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


# -- over HTTP on the Unix socket, and the executable --------------------------------------------


def test_http_keep_alive_and_mock_header(mock: Mock, tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    server = ApiServer(path, mock.api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(path)
        http_conn = http.client.HTTPConnection("localhost")
        http_conn.sock = conn  # one socket, several requests: keep-alive
        for _ in range(3):
            http_conn.request("GET", "/version")
            reply = http_conn.getresponse()
            assert reply.status == 200 and reply.getheader("X-Fcvm-Mock") == "1"
            assert json.loads(reply.read()) == {"firecracker_version": "1.16.1"}
        http_conn.request("PUT", "/mmds", body=b"{\"a\": 1}", headers={"Content-Type": "application/json"})
        reply = http_conn.getresponse()
        assert reply.status == 204 and reply.read() == b""
        big = b"{\"a\": \"" + b"x" * 60000 + b"\"}"
        http_conn.request("PUT", "/mmds", body=big)
        reply = http_conn.getresponse()
        assert reply.status == 400 and b"larger than the limit" in reply.read()
        http_conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_executable_identifies_as_fc_mock() -> None:
    info = identify(fc_mock_binary())
    assert info.mock and info.version == "1.16.1" and info.display_name == "firecracker (fc-mock)"
    assert describe_binary(fc_mock_binary()).startswith("firecracker (fc-mock) 1.16.1 at ")


def test_executable_without_spec_fails_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "FCVM_FC_SPEC": str(tmp_path / "missing.yaml")}
    result = subprocess.run([fc_mock_binary(), "--api-sock", str(tmp_path / "s")], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "Firecracker API spec" in result.stderr and "missing.yaml" in result.stderr
    assert not (tmp_path / "s").exists()


def test_executable_boots_with_config_file_and_exits_on_ctrl_alt_del(tmp_path: Path, sleeping_fc_mock: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0")
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(kernel)},
                                  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}))
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen([sleeping_fc_mock, "--api-sock", str(sock), "--id", "t1", "--config-file", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no API socket"
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost") as api:
            for _ in range(100):
                state = api.get("/").json()["state"]
                if state == "Running":
                    break
                time.sleep(0.05)
            assert state == "Running"
            assert api.put("/actions", json={"action_type": "SendCtrlAltDel"}).status_code == 204
        assert proc.wait(timeout=20) == 0
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert "[t1:main] Running Firecracker v1.16.1" in out
        assert not sock.exists() and not (tmp_path / "fc-mock-t1").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_module_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "fcvm_standins.fc_mock.main", "--version"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "(fc-mock)" in result.stdout


def test_a_relative_spec_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FCVM_FC_SPEC=../shared/... as a user types it: resolved against their directory, then absolute, so the
    stand-in jailer can hand it on into a jail whose working directory is /."""
    from fcvm_standins.fc_mock.spec import SPEC_ENV, find_spec

    spec = tmp_path / "shared" / "spec.yaml"
    spec.parent.mkdir()
    spec.write_text("openapi: 3.0.1\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv(SPEC_ENV, "../shared/spec.yaml")
    assert find_spec() == spec
