"""The fuse-pipe stream survives resets: the relay reconnects and re-sends, the mount never breaks."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.fusepipe.server import Server
from tests.support import require, require_root


def _mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


class ResettingProxy:
    """Forwards streams to the server; `reset()` cuts every stream, like a vsock channel reset."""

    def __init__(self, listen: str, target: str) -> None:
        self.target = target
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(listen)
        self.listener.listen()
        self.socks: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b.connect(self.target)
            self.socks += [a, b]
            self.accepted += 1
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(1 << 20):
                y.sendall(data)
        except OSError:
            pass
        for s in (x, y):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.socks = []

    def close(self) -> None:
        self.reset()
        self.listener.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path, ResettingProxy]]:
    require_root()
    require(os.path.exists("/dev/fuse"), "needs /dev/fuse")
    base = Path("/var/tmp") / f"fp-rc-{os.getpid()}"
    src, mnt = base / "src", base / "mnt"
    for d in (src, mnt):
        d.mkdir(parents=True)
    server = Server(str(src))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(base / "server.sock"))
    listener.listen()
    threading.Thread(target=server.serve_forever, args=(listener,), daemon=True).start()
    proxy = ResettingProxy(str(base / "proxy.sock"), str(base / "server.sock"))
    proc = subprocess.Popen([sys.executable, "-m", "fcvm", "fuse-pipe", "mount", "--socket",
                             str(base / "proxy.sock"), "--readers", "2", str(mnt)])
    deadline = time.monotonic() + 20
    while not _mounted(mnt):
        assert proc.poll() is None and time.monotonic() < deadline, "mount did not come up"
        time.sleep(0.05)
    try:
        yield src, mnt, proxy
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if _mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        proxy.close()
        server.close()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)


def test_mount_survives_repeated_stream_resets(setup: tuple[Path, Path, ResettingProxy]) -> None:
    src, mnt, proxy = setup
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(n: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                p = mnt / f"w{n}-{i % 20}"
                data = f"{n}:{i}".encode() * 100
                with open(p, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                assert p.read_bytes() == data
                os.mkdir(mnt / f"d{n}-{i}")
                os.rmdir(mnt / f"d{n}-{i}")
                i += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(8):
        time.sleep(0.15)
        proxy.reset()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert proxy.accepted >= 9  # it really reconnected after every reset
    assert _mounted(mnt)
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(src))
    assert not [p for p in os.listdir(src) if p.startswith("d")]


def test_exact_guest_modes_never_leak_a_zero_umask(tmp_path: Path) -> None:
    """Files get exactly the guest's mode, yet the process (the VM supervisor runs the server in-process)
    keeps its own umask, on the main thread and on worker threads alike."""
    code = (
        "import os, sys, threading\n"
        "from fcvm.fusepipe import Server\n"
        "from fcvm.fusepipe.sysc import exact_modes\n"
        "os.umask(0o022)\n"
        "Server(sys.argv[1])\n"
        "def create(name):\n"
        "    with exact_modes():\n"
        "        os.close(os.open(os.path.join(sys.argv[1], name), os.O_CREAT | os.O_WRONLY, 0o666))\n"
        "create('main')\n"
        "t = threading.Thread(target=create, args=('worker',)); t.start(); t.join()\n"
        "print(oct(os.umask(0o022)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "0o22"
    assert (tmp_path / "main").stat().st_mode & 0o777 == 0o666
    assert (tmp_path / "worker").stat().st_mode & 0o777 == 0o666
