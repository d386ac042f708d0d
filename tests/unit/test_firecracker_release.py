from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core.errors import FcvmError
from fcvm.vmm.firecracker import release


def _release(tmp_path: Path, version: str = "1.16.1", *, sums: bool = True, corrupt: bool = False) -> Path:
    tarball = tmp_path / f"firecracker-v{version}-x86_64.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for tool in ("firecracker", "jailer"):
            data = f"#!/bin/sh\necho {tool} v{version}\n".encode()
            info = tarfile.TarInfo(f"release-v{version}-x86_64/{tool}-v{version}-x86_64")
            info.size, info.mode = len(data), 0o755
            archive.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if corrupt:
        digest = "0" * 64
    if sums:
        (tmp_path / "SHA256SUMS").write_text(f"{digest}  {tarball.name}\n")
    return tarball


def test_installs_firecracker_and_jailer_from_a_verified_tarball(tmp_path: Path) -> None:
    binary = release.install_tarball(_release(tmp_path))
    assert binary == release.installed_binary()
    assert binary.read_text() == "#!/bin/sh\necho firecracker v1.16.1\n"
    assert (binary.parent / "jailer").stat().st_mode & 0o111


def test_a_checksum_mismatch_installs_nothing(tmp_path: Path) -> None:
    with pytest.raises(FcvmError, match=r"checksum mismatch for firecracker-v1\.16\.1-x86_64\.tgz"):
        release.install_tarball(_release(tmp_path, corrupt=True))
    assert release.installed_binary() is None


def test_a_tarball_without_checksums_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FcvmError, match="no SHA256SUMS beside"):
        release.install_tarball(_release(tmp_path, sums=False))


def test_a_file_that_is_not_a_release_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "firecracker.tar.gz"
    other.write_bytes(b"")
    with pytest.raises(FcvmError, match="is not a Firecracker release tarball"):
        release.install_tarball(other)


def test_a_failed_download_says_what_to_do_instead(tmp_path: Path) -> None:
    with pytest.raises(FcvmError, match=r"cannot download Firecracker 1\.16\.1.*pass --tarball"):
        release.download_and_install("1.16.1", tmp_path, base_url="http://127.0.0.1:9/v{version}/{name}")


@pytest.fixture
def release_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A stand-in for GitHub's release downloads, serving whatever the test puts in its directory."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/{{name}}"
    server.shutdown()
    server.server_close()


def test_a_download_is_checked_against_the_pinned_checksum_not_the_published_one(
    tmp_path: Path, release_server: tuple[Path, str]
) -> None:
    served, url = release_server
    tarball = _release(served, "1.16.1")  # not the official bytes, with a matching published checksum
    (served / f"{tarball.name}.sha256.txt").write_text(hashlib.sha256(tarball.read_bytes()).hexdigest() + "\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    pinned = release.PINNED_SHA256[("1.16.1", "x86_64")]
    with pytest.raises(FcvmError, match=f"checksum mismatch for firecracker-v1.16.1-x86_64.tgz: expected {pinned}"):
        release.download_and_install("1.16.1", scratch, base_url=url)
    assert release.installed_binary() is None


def test_an_unpinned_version_is_checked_against_its_published_checksum(
    tmp_path: Path, release_server: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    served, url = release_server
    tarball = _release(served, "1.15.0", sums=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (served / f"{tarball.name}.sha256.txt").write_text("0" * 64 + "\n")
    with pytest.raises(FcvmError, match="checksum mismatch"):
        release.download_and_install("1.15.0", scratch, base_url=url)
    (served / f"{tarball.name}.sha256.txt").write_text(hashlib.sha256(tarball.read_bytes()).hexdigest() + "\n")
    binary = release.download_and_install("1.15.0", scratch, base_url=url)
    assert binary.read_text() == "#!/bin/sh\necho firecracker v1.15.0\n"
    assert "Firecracker 1.15.0 is not pinned by fcvm" in caplog.text
