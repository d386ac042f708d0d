"""Installing a Firecracker release: a local tarball, or the official GitHub release, checksum-verified."""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from fcvm.core import log, paths
from fcvm.core.errors import FcvmError

_log = log.get("firecracker")
DEFAULT_VERSION = "1.16.1"
ARCH = "x86_64"
RELEASE_URL = "https://github.com/firecracker-microvm/firecracker/releases/download/v{version}/{name}"
_TARBALL = re.compile(r"^firecracker-v(\d+\.\d+\.\d+)-(x86_64|aarch64)\.tgz$")
# SHA-256 of the official release tarballs fcvm downloads. A download is checked against this, not against a
# checksum fetched from the same place as the tarball. Bump version and checksum together, after comparing the
# release's own firecracker-vX.Y.Z-<arch>.tgz.sha256.txt.
PINNED_SHA256 = {
    ("1.16.1", "x86_64"): "382a02a869e4d6d5cb14c40577f9545e8458021ea8b0b2d3fc10ec14d9c242e6",
}


def install_dir() -> Path:
    return paths.data_dir() / "bin"


def installed_binary() -> Path | None:
    binary = install_dir() / "firecracker"
    return binary if binary.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_checksum(tarball: Path) -> str:
    """From `SHA256SUMS` beside the tarball, or the release's `<tarball>.sha256.txt`."""
    for candidate in (tarball.parent / "SHA256SUMS", tarball.with_name(tarball.name + ".sha256.txt")):
        if not candidate.is_file():
            continue
        for line in candidate.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[1].lstrip("*") == tarball.name:
                return words[0].lower()
            if len(words) == 1 and re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
                return words[0].lower()
        raise FcvmError(f"{candidate} has no checksum for {tarball.name}")
    raise FcvmError(f"no SHA256SUMS beside {tarball}",
                    hint=f"put the release's SHA256SUMS (or {tarball.name}.sha256.txt) next to it")


def install_tarball(tarball: Path, expected: str | None = None) -> Path:
    """Install firecracker and jailer from a release tarball whose SHA-256 is `expected`, or else the one in the
    SHA256SUMS beside it."""
    match = _TARBALL.match(tarball.name)
    if not match:
        raise FcvmError(f"{tarball.name} is not a Firecracker release tarball (firecracker-vX.Y.Z-{ARCH}.tgz)")
    version, arch = match.groups()
    if arch != ARCH:
        raise FcvmError(f"{tarball.name} is for {arch}; this host needs {ARCH}")
    expected = expected or expected_checksum(tarball)
    actual = _sha256(tarball)
    if actual != expected:
        raise FcvmError(f"checksum mismatch for {tarball.name}: expected {expected}, got {actual}",
                        hint="the download is corrupt or not the official release")
    member_names = {f"release-v{version}-{arch}/{tool}-v{version}-{arch}": tool for tool in ("firecracker", "jailer")}
    target = paths.ensure_dir(install_dir())
    with tarfile.open(tarball) as archive, tempfile.TemporaryDirectory(dir=target) as staging:
        installed: list[str] = []
        for member in archive.getmembers():
            tool = member_names.get(member.name)
            if tool is None or not member.isfile():
                continue
            source = archive.extractfile(member)
            assert source is not None
            staged = Path(staging) / tool
            with source, open(staged, "wb") as out:
                shutil.copyfileobj(source, out)
            staged.chmod(0o755)
            staged.rename(target / tool)
            installed.append(tool)
        if "firecracker" not in installed:
            raise FcvmError(f"{tarball.name} does not contain release-v{version}-{arch}/firecracker-v{version}-{arch}")
    _log.info("installed Firecracker %s (%s) into %s", version, ", ".join(installed), target)
    return target / "firecracker"


def download_and_install(version: str, dest_dir: Path, *, base_url: str = RELEASE_URL) -> Path:
    """Fetch the official release tarball and install it, checked against the pinned checksum. A version fcvm
    does not pin is checked against the checksum published with it, with a warning."""
    pinned = PINNED_SHA256.get((version, ARCH))
    tarball = download(version, dest_dir, with_checksum=pinned is None, base_url=base_url)
    if pinned is None:
        _log.warning("Firecracker %s is not pinned by fcvm: trusting the checksum published beside the download "
                     "(pinned: %s)", version, ", ".join(v for v, a in PINNED_SHA256 if a == ARCH))
    return install_tarball(tarball, pinned)


def download(version: str, dest_dir: Path, *, with_checksum: bool, base_url: str = RELEASE_URL) -> Path:
    """Fetch the release tarball, and with `with_checksum` its published `.sha256.txt`."""
    import httpx

    name = f"firecracker-v{version}-{ARCH}.tgz"
    tarball = dest_dir / name
    for file_name in (name, f"{name}.sha256.txt") if with_checksum else (name,):
        url = base_url.format(version=version, name=file_name)
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=30) as response:
                response.raise_for_status()
                with open(dest_dir / file_name, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise FcvmError(
                f"cannot download Firecracker {version} from {url}: {exc}",
                hint="on a host without internet access, pass --tarball with a release tarball and its SHA256SUMS",
            ) from None
    return tarball
