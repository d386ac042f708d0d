from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from fcvm.core.errors import FcvmError
from fcvm.vmm import firecracker_release as release


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
        release.download("1.16.1", tmp_path, base_url="http://127.0.0.1:9/v{version}/{name}")
