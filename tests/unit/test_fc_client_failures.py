"""FirecrackerVm against misbehaving fake Firecracker binaries: clear errors, nothing left behind.

Each fake is a small Python script speaking just enough of the API; the happy path runs against
`fcvm-fc-mock` with a fake backend (no QEMU).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from fcvm.core.errors import FcvmError
from fcvm.vmm.base import Drive, MachineSpec
from fcvm.vmm.firecracker.binary import find_firecracker
from fcvm.vmm.firecracker.client import FirecrackerApiError, FirecrackerError
from fcvm.vmm.firecracker.vm import FirecrackerVm

FAKE = r'''#!{python}
import argparse, json, os, signal, socketserver, subprocess, sys, time
from http.server import BaseHTTPRequestHandler

MODE = {mode!r}
VERSION = {version!r}
p = argparse.ArgumentParser()
p.add_argument("--api-sock"); p.add_argument("--id"); p.add_argument("--level")
args = p.parse_args()
print("2026-11-26T18:00:00.000000000 [%s:main] fake firecracker %s" % (args.id, MODE), flush=True)
if MODE == "exit-early":
    print("Error: cannot open /dev/kvm: No such device", file=sys.stderr, flush=True)
    sys.exit(1)
if MODE == "no-socket":
    time.sleep(3600)
if MODE == "grandchild":
    child = subprocess.Popen(["sleep", "3600"])
    open({pidfile!r}, "w").write(str(child.pid))
if MODE == "ignore-stop":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def address_string(self): return "uds"
    def log_message(self, *a): pass
    def reply(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self.reply(200, {{"firecracker_version": VERSION}})
    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if MODE in ("die-mid-boot", "grandchild") and self.path == "/machine-config":
            print("fake: segfault while configuring vCPUs", flush=True)
            os._exit(3)
        if MODE == "reject" and self.path == "/drives/root":
            fault = "Unable to create the block device: BackingFile(Os {{ code: 2 }})"
            return self.reply(400, {{"fault_message": fault}})
        self.reply(204)
    do_PATCH = do_PUT

socketserver.UnixStreamServer(args.api_sock, H).serve_forever()
'''


def make_fake(tmp_path: Path, mode: str, version: str = "1.16.1") -> Path:
    path = tmp_path / f"fake-{mode}"
    path.write_text(FAKE.format(python=sys.executable, mode=mode, version=version,
                                pidfile=str(tmp_path / "grandchild.pid")))
    path.chmod(0o755)
    return path


def machine(tmp_path: Path) -> MachineSpec:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    root = tmp_path / "root.ext4"
    root.write_bytes(b"\0" * 4096)
    work = tmp_path / "vm"
    return MachineSpec(name="web", workdir=work, kernel=kernel, initrd=None, boot_args="console=ttyS0",
                       vcpus=1, mem_mib=128, drives=[Drive("root", root, root=True)], vsock_uds=work / "v.sock")


def assert_nothing_left(vm: FirecrackerVm, tmp_path: Path) -> None:
    ref = vm.process
    assert not ref.alive(), "the Firecracker process is still running"
    assert not vm.api_socket.exists(), "the API socket was left behind"
    assert vm.spec.vsock_uds is not None and not vm.spec.vsock_uds.exists()
    pidfile = tmp_path / "grandchild.pid"
    if pidfile.exists():
        assert _gone(int(pidfile.read_text())), "the VMM's child outlived it"


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return b") Z" in stat  # a zombie waiting for init counts as gone


def test_dies_mid_boot(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=make_fake(tmp_path, "die-mid-boot"), mmds=None)
    with pytest.raises(FirecrackerError, match=r"exited with code 3 during PUT /machine-config: .*segfault"):
        vm.start()
    assert_nothing_left(vm, tmp_path)
    assert "segfault while configuring vCPUs" in vm.spec.console_log.read_text()


def test_dies_mid_boot_takes_its_children_along(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=make_fake(tmp_path, "grandchild"), mmds=None)
    with pytest.raises(FirecrackerError, match="exited with code 3"):
        vm.start()
    assert (tmp_path / "grandchild.pid").exists()
    assert_nothing_left(vm, tmp_path)


def test_400_carries_fault_message_and_cleans_up(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=make_fake(tmp_path, "reject"), mmds=None)
    with pytest.raises(FirecrackerApiError) as caught:
        vm.start()
    error = caught.value
    assert isinstance(error, FcvmError)
    assert error.status == 400 and error.path == "/drives/root"
    assert str(error) == ("Firecracker rejected PUT /drives/root (400): "
                          "Unable to create the block device: BackingFile(Os { code: 2 })")
    assert_nothing_left(vm, tmp_path)


def test_never_creates_its_socket(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=make_fake(tmp_path, "no-socket"), mmds=None, socket_timeout=1)
    started = time.monotonic()
    with pytest.raises(FirecrackerError, match=r"did not create its API socket .*firecracker.sock within 1 s"):
        vm.start()
    assert time.monotonic() - started < 8
    assert_nothing_left(vm, tmp_path)


def test_exits_before_creating_its_socket(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=make_fake(tmp_path, "exit-early"), mmds=None)
    with pytest.raises(FirecrackerError, match=r"exited with code 1 before creating its API socket: .*/dev/kvm"):
        vm.start()
    assert_nothing_left(vm, tmp_path)


def test_unsupported_version_is_refused(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=make_fake(tmp_path, "ok", version="1.10.1"), mmds=None)
    with pytest.raises(FcvmError, match=r"Firecracker 1\.10\.1 is not supported: fcvm supports 1\.12 to 1\.16"):
        vm.start()
    assert_nothing_left(vm, tmp_path)


def test_missing_binary(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=tmp_path / "nope", mmds=None)
    with pytest.raises(FirecrackerError, match=r"cannot run .*nope"):
        vm.start()
    assert not vm.api_socket.exists()


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    vm = FirecrackerVm(machine(tmp_path), binary=make_fake(tmp_path, "ignore-stop"), mmds=None)
    vm.start()
    assert vm.name == "firecracker"  # no X-Fcvm-Mock header
    assert vm.wait(timeout=0.1) is None
    started = time.monotonic()
    vm.stop(timeout=0.5)
    assert time.monotonic() - started < 10
    assert vm.wait() == -9
    assert_nothing_left(vm, tmp_path)
    vm.stop()  # idempotent


def test_mmds_needs_a_network_interface(tmp_path: Path) -> None:
    with pytest.raises(FcvmError, match="MMDS needs a network interface"):
        FirecrackerVm(machine(tmp_path), binary=Path("/bin/true"), mmds={"a": 1})


def test_boots_through_fc_mock_and_stops_cleanly(tmp_path: Path, sleeping_fc_mock: Path) -> None:
    spec = machine(tmp_path)
    spec.workdir.mkdir()
    (spec.workdir / "firecracker.sock").write_text("stale")  # Firecracker would refuse to start
    assert spec.vsock_uds is not None
    spec.vsock_uds.write_text("stale")
    vm = FirecrackerVm(spec, binary=sleeping_fc_mock, mmds=None)
    vm.start()
    try:
        assert vm.name == "firecracker (fc-mock)" and vm.version == "1.16.1"
        assert vm.process.alive()
        vm.pause()
        vm.resume()
    finally:
        vm.stop(timeout=10)
    assert vm.wait() == 0  # fc-mock exits 0 once the guest is gone, like Firecracker
    console = spec.console_log.read_text()
    assert "guest: console=ttyS0 root=/dev/vda rw pci=off" in console
    assert "Running Firecracker v1.16.1" in console and "[web:main]" not in console  # prefix stripped
    assert_nothing_left(vm, tmp_path)
    assert sorted(os.listdir(spec.workdir)) == ["console.log"]


def test_find_firecracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake(tmp_path, "ok")
    monkeypatch.delenv("FCVM_FIRECRACKER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_firecracker(None) is None
    assert find_firecracker(str(fake)) == fake.resolve()
    with pytest.raises(FcvmError, match="from --firecracker-bin"):
        find_firecracker(str(tmp_path / "missing"))
    monkeypatch.setenv("FCVM_FIRECRACKER_BIN", str(fake))
    assert find_firecracker(None) == fake.resolve()
    monkeypatch.setenv("FCVM_FIRECRACKER_BIN", str(tmp_path / "gone"))
    with pytest.raises(FcvmError, match="FCVM_FIRECRACKER_BIN"):
        find_firecracker(None)
    monkeypatch.delenv("FCVM_FIRECRACKER_BIN")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "firecracker").symlink_to(fake)
    monkeypatch.setenv("PATH", str(bindir))
    assert find_firecracker(None) == fake.resolve()
    installed = Path(os.environ["FCVM_DATA_DIR"]) / "bin" / "firecracker"  # `fcvm setup firecracker`
    installed.parent.mkdir(parents=True)
    shutil.copy(fake, installed)
    assert find_firecracker(None) == installed.resolve()
