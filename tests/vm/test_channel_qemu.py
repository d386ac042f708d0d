"""The agent channel through a real QEMU virtio-serial port: bridge <-> QEMU chardev <-> guest mux.

The guest runs `python3 -m fc_agent.selftest` twice in a row (fcvm_init hook) instead of the
agent, so the second run is a real guest-side restart on the same port while the bridge stays connected.
Prints throughput and round-trip figures (informational; bench/channel.py is the benchmark).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.channel import SerialVsockBridge, VsockConnectError, connect_vsock
from tests.support import require, require_tool

pytestmark = pytest.mark.timeout(600)

REPORT, ECHO = 1000, 1024
SELFTEST = "python3 -m fc_agent.selftest"


class Vm:
    def __init__(self, workdir: Path, qemu: subprocess.Popen[bytes], bridge: SerialVsockBridge) -> None:
        self.workdir = workdir
        self.qemu = qemu
        self.bridge = bridge
        self.uds = bridge.uds_path
        self.reports = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.reports.bind(f"{self.uds}_{REPORT}")
        self.reports.listen(4)
        self.reports.settimeout(240)

    def console(self) -> str:
        return (self.workdir / "console.log").read_text(errors="replace")[-4000:]

    def next_report(self) -> tuple[socket.socket, str]:
        try:
            conn, _ = self.reports.accept()
        except TimeoutError:
            pytest.fail(f"the guest never reported on port {REPORT}; console:\n{self.console()}")
        conn.settimeout(30)
        line = b""
        while not line.endswith(b"\n"):
            byte = conn.recv(1)
            assert byte, "report stream closed early"
            line += byte
        return conn, line.decode().strip()

    def connect(self, port: int, within: float = 30.0) -> socket.socket:
        deadline = time.monotonic() + within
        while True:
            try:
                return connect_vsock(self.uds, port, 5)
            except VsockConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.fixture
def vm() -> Iterator[Vm]:
    require_tool("qemu-system-x86_64")
    try:
        from fcvm.guest import find_kernel, find_rootfs, qemu_boot_args
    except ImportError as exc:  # the guest asset builder is not there yet
        require(False, f"fcvm.guest cannot find guest assets: {exc}")
        raise
    kernel = find_kernel(refresh_initramfs=True)
    rootfs = find_rootfs()
    require(kernel is not None and rootfs is not None,
            "guest kernel/rootfs not built: run `fcvm setup` (fcvm.guest.ensure_kernel/ensure_rootfs)")
    assert kernel is not None and rootfs is not None
    workdir = Path(tempfile.mkdtemp(prefix="chvm", dir="/tmp"))  # short: Unix socket paths
    disk = workdir / "rootfs.ext4"
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(rootfs), str(disk)], check=True)
    serial = workdir / "serial.sock"
    hook = f'fcvm_init="{SELFTEST}; {SELFTEST}; {SELFTEST}; poweroff -f"'
    accel = ["-accel", "kvm", "-cpu", "host"] if os.access("/dev/kvm", os.R_OK | os.W_OK) and _kvm_ok() else [
        "-accel", "tcg,thread=single", "-cpu", "max"]  # fmt: skip
    argv = [
        "qemu-system-x86_64", *accel, "-M", "microvm", "-m", "512", "-smp", "2",
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-kernel", str(kernel.bzimage), "-initrd", str(kernel.initramfs),
        "-append", f"{qemu_boot_args()} {hook}",
        "-drive", f"id=d0,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=d0",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={serial},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.fcvm.agent",
    ]  # fmt: skip
    console = open(workdir / "console.log", "wb")  # noqa: SIM115 - closed below
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not serial.exists():
        assert qemu.poll() is None, (workdir / "console.log").read_text()
        assert time.monotonic() < deadline, "QEMU did not create the chardev socket"
        time.sleep(0.01)
    bridge = SerialVsockBridge(serial, workdir / "v.sock")
    bridge.start()
    machine = Vm(workdir, qemu, bridge)
    try:
        yield machine
    finally:
        machine.reports.close()
        machine.bridge.close()
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        console.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _kvm_ok() -> bool:
    """KVM is usable only if the host's fcvm.host says so (nested setups may expose a broken /dev/kvm)."""
    try:
        from fcvm.core import host

        return bool(host.kvm_status().usable)
    except Exception:
        return False


def _echo_check(sock: socket.socket, payload: bytes) -> None:
    received = bytearray()

    def reader() -> None:
        while len(received) < len(payload):
            data = sock.recv(1 << 16)
            assert data
            received.extend(data)

    thread = threading.Thread(target=reader)
    thread.start()
    sock.sendall(payload)
    thread.join(120)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_channel_through_qemu_virtio_serial(vm: Vm) -> None:
    report, line = vm.next_report()  # guest -> host: the selftest reached <uds>_1000
    assert line.startswith("up serial "), line
    first_pid = line.split()[2]

    # host -> guest: CONNECT/OK and an echo, byte for byte, several streams at once
    socks = [vm.connect(ECHO) for _ in range(8)]
    payloads = [random.Random(i).randbytes(2 << 20) for i in range(8)]
    checks = [threading.Thread(target=_echo_check, args=(s, p)) for s, p in zip(socks, payloads, strict=True)]
    started = time.monotonic()
    for thread in checks:
        thread.start()
    for thread in checks:
        thread.join()
    parallel = 8 * (2 << 20) / (time.monotonic() - started) / 1e6
    for sock in socks:
        sock.close()

    with vm.connect(ECHO) as sock:
        payload = random.Random(99).randbytes(16 << 20)
        started = time.monotonic()
        _echo_check(sock, payload)
        single = len(payload) / (time.monotonic() - started) / 1e6
        rtts = []
        for _ in range(300):
            t0 = time.perf_counter()
            sock.sendall(b"!")
            assert sock.recv(1) == b"!"
            rtts.append(time.perf_counter() - t0)
    rtts.sort()
    print(
        f"\nQEMU virtio-serial channel: echo 1 stream {single:.1f} MB/s each way, 8 streams {parallel:.1f} MB/s,"
        f" rtt p50 {statistics.median(rtts) * 1e6:.0f} us p99 {rtts[int(len(rtts) * 0.99) - 1] * 1e6:.0f} us"
    )

    # a port nobody listens on in the guest: refused (the guest closes the stream, no OK), well before a
    # generous handshake deadline that a connection left hanging would end in
    with pytest.raises(VsockConnectError) as excinfo:
        connect_vsock(vm.uds, 4242, 60)
    assert excinfo.value.refused

    # guest restart: closing the report stream ends the first selftest; the second one opens the port
    # again with a new session, which resets the old streams.
    stale = vm.connect(ECHO)
    sessions = vm.bridge.engine.sessions
    report.close()
    report2, line2 = vm.next_report()
    assert line2.startswith("up serial ") and line2.split()[2] != first_pid
    assert vm.bridge.engine.sessions > sessions
    stale.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        assert stale.recv(10) == b""
    stale.close()
    with vm.connect(ECHO) as sock:
        _echo_check(sock, b"after restart" * 1000)

    # host restart: a new bridge (new vsock path) on the same chardev. The guest sees the port's host
    # side go away, its streams reset (so the second selftest's report stream ends and it exits), and the
    # third selftest reaches the new bridge.
    vm.bridge.close()
    vm.reports.close()
    vm.bridge = SerialVsockBridge(vm.workdir / "serial.sock", vm.workdir / "w.sock")
    vm.bridge.start()
    vm.uds = vm.bridge.uds_path
    vm.reports = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    vm.reports.bind(f"{vm.uds}_{REPORT}")
    vm.reports.listen(4)
    vm.reports.settimeout(120)
    report3, line3 = vm.next_report()
    assert line3.startswith("up serial ") and line3.split()[2] not in (first_pid, line2.split()[2])
    report2.close()
    with vm.connect(ECHO) as sock:
        _echo_check(sock, b"new bridge" * 1000)
    report3.close()
    assert vm.qemu.wait(120) == 0, vm.console()
