"""Container images without a registry: export from the host's podman storage onto a read-only disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fcvm.core import log, paths, proc
from fcvm.core.errors import FcvmError

_log = log.get("storage")
_SECTOR = 512


@dataclass(frozen=True)
class ImageDisk:
    ref: str
    path: Path  # docker-archive tar, zero-padded to a whole number of sectors
    archive_size: int
    image_id: str


class ImageNotFound(FcvmError):
    pass


def image_id(ref: str) -> str | None:
    result = proc.run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], check=False, timeout=60)
    if result.returncode != 0:
        return None
    return result.stdout.decode().strip()


def _cache_dirs() -> list[Path]:
    """Where exported image disks are looked up: beside the guest assets, then in the data dir. The disk is named
    by the image id (a digest of its content) and name, so another user's export of the same image is as good."""
    return [paths.assets_dir() / "images", paths.data_dir() / "images"]


def _writable_cache_dir() -> Path:
    """Beside the guest assets, unless they are shared read-only (a user with root's `FCVM_ASSETS_DIR`): then the
    user's own data dir."""
    shared, own = _cache_dirs()
    with contextlib.suppress(OSError):
        paths.ensure_dir(shared)
    return shared if os.access(shared, os.W_OK | os.X_OK) else paths.ensure_dir(own, 0o700)


def export_image(ref: str) -> ImageDisk | None:
    """The image as a disk, cached by image id and name; None when the host does not have it.

    A `localhost/` image can only come from the host, so its absence is an error."""
    identity = image_id(ref)
    if identity is None:
        if ref.startswith("localhost/"):
            raise ImageNotFound(
                f"image {ref!r} is not in the host's podman storage",
                hint="build it with podman (or `fcvm setup demo-image` for the demo images)",
            )
        _log.info("%s is not in the host's podman storage; the guest will pull it", ref)
        return None
    key = hashlib.sha256(f"{identity}\0{ref}".encode()).hexdigest()[:32]
    for directory in _cache_dirs():
        target = directory / f"{key}.tar"
        size_file = target.with_suffix(".size")
        # Another user's export (owner-only) is no use to us: our VMM could not open it.
        if target.exists() and size_file.exists() and os.access(target, os.R_OK):
            paths.keep_private(target)  # exported by an older fcvm, world-readable
            break
    else:
        target = _writable_cache_dir() / f"{key}.tar"
        size_file = target.with_suffix(".size")
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            # The archive is the image's every file, secrets baked into it included: only its owner may read it
            # (root's own podman storage is private too). podman writes into the file we created.
            paths.make_private(partial)
            proc.run(["podman", "save", "--format", "docker-archive", "-o", partial, ref], timeout=600)
            paths.keep_private(partial)  # in case a podman replaced the file instead of writing into it
            size = partial.stat().st_size
            with open(partial, "ab") as archive:
                archive.truncate(-(-size // _SECTOR) * _SECTOR)
            size_file.write_text(str(size))
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
        _log.debug("exported %s (%s) to %s", ref, identity[:12], target)
    return ImageDisk(ref, target, int(size_file.read_text()), identity)
