"""What another local user can reach of fcvm's host state: nothing private (tried as uid 65534)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fcvm.core import paths
from fcvm.core.wait import wait_until
from fcvm.state import Store
from fcvm.storage.images import export_image, image_id
from tests.support import as_other_user, require, require_root


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def read_file(path: Path) -> Callable[[], object]:
    return lambda: len(path.read_bytes())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may pass through (not list), like a home directory or /run/user/N's parent."""
    path = Path(tempfile.mkdtemp(prefix="fcvm-shared-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_another_user_can_neither_list_the_data_dir_nor_read_the_state_store(isolated_data_dir: Path) -> None:
    isolated_data_dir.rmdir()  # fcvm creates it, as on first use
    store = Store()
    store.create_vm("private-name")  # the WAL and its index exist while a connection is open
    data = paths.data_dir()
    try:
        assert as_other_user(lambda: os.listdir(data)) == "PermissionError: Permission denied"
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            assert (data / name).exists()
            assert as_other_user(read_file(data / name)) == "PermissionError: Permission denied", name
    finally:
        store.close()


def test_an_exported_image_is_readable_by_its_owner_only(monkeypatch: pytest.MonkeyPatch,
                                                         shared_dir: Path) -> None:
    """The archive holds every file of the image; podman keeps root's images private, so must fcvm."""
    require(image_id("localhost/fcvm-busybox") is not None, "needs the demo image (fcvm setup demo-image)")
    assets = shared_dir / "assets"
    assets.mkdir(mode=0o755)
    monkeypatch.setenv(paths.ASSETS_DIR_ENV, str(assets))
    disk = export_image("localhost/fcvm-busybox")
    assert disk is not None
    assert stat.S_IMODE(disk.path.stat().st_mode) == 0o600
    assert as_other_user(read_file(disk.path)) == "PermissionError: Permission denied"


@contextlib.contextmanager
def listening(argv: list[str], sock: Path) -> Iterator[subprocess.Popen[str]]:
    """`fcvm ARGV` started under umask 0, once it listens on `sock`; terminated afterwards."""
    server = subprocess.Popen([sys.executable, "-m", "fcvm", *argv], preexec_fn=lambda: os.umask(0),
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: sock.exists() or server.poll() is not None, 20)
        assert server.poll() is None, server.communicate()[1]
        assert sock.exists(), f"fcvm {' '.join(argv[:2])} did not listen"
        yield server
    finally:
        server.terminate()
        server.wait(30)


def test_fuse_pipe_serve_socket_is_owner_only_whatever_the_umask(shared_dir: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    sock = shared_dir / "fp.sock"
    with listening(["fuse-pipe", "serve", str(served), "--socket", str(sock)], sock):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        def connect() -> object:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(sock))
            return "connected"

        assert as_other_user(connect) == "PermissionError: Permission denied"


def test_snapshot_serve_files_are_owner_only(tmp_path: Path) -> None:
    """The working set and metrics a memory server writes belong to the snapshot: its owner's alone."""
    mem = tmp_path / "memory"
    mem.write_bytes(os.urandom(1 << 20))
    sock, metrics = tmp_path / "uffd.sock", tmp_path / "metrics.json"
    with listening(["snapshot", "serve", "--mem-file", str(mem), "--socket", str(sock), "--metrics-json",
                    str(metrics)], sock) as server:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        server.terminate()
        assert server.wait(30) == 0
    assert json.loads(metrics.read_text())["server"]
    assert stat.S_IMODE(metrics.stat().st_mode) == 0o600
