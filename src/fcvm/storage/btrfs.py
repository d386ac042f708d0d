"""The data directory's filesystem: btrfs (a loopback image if needed) so per-VM disks are reflinks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from fcvm.core import log, paths, proc
from fcvm.core.errors import FcvmError

_log = log.get("storage")
_FICLONE = 0x40049409
_warned_copy = False


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the deepest mount in /proc/self/mountinfo)."""
    target = path.resolve()
    while not target.exists():
        target = target.parent
    best, fstype = "", "unknown"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].encode().decode("unicode_escape")
        inside = str(target) == mount_point or str(target).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, right.split()[0]
    return fstype


def reflink_works(directory: Path) -> bool:
    paths.ensure_dir(directory)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".reflink-probe-") as tmp:
        src, dst = Path(tmp) / "a", Path(tmp) / "b"
        src.write_bytes(b"fcvm" * 1024)
        try:
            _ficlone(src, dst)
        except OSError:
            return False
        return dst.read_bytes() == src.read_bytes()


def _ficlone(src: Path, dst: Path) -> None:
    with open(src, "rb") as source, open(dst, "wb") as target:
        fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())


def clone_file(src: Path, dst: Path) -> bool:
    """Copy-on-write copy of `src` to `dst` (a reflink); falls back, with a warning, to a sparse copy (the
    rootfs image is mostly holes: 2 GiB with about 450 MB used).

    Returns True when the copy was a reflink."""
    global _warned_copy
    try:
        _ficlone(src, dst)
        return True
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        if not _warned_copy:
            _log.warning(
                "%s does not support reflinks (%s); copying disks in full. Run `fcvm setup storage`.",
                dst.parent, exc.strerror,
            )
            _warned_copy = True
    proc.run(["cp", "--sparse=always", src, dst], timeout=600)
    return False


def loop_image_path(data_dir: Path) -> Path:
    """The loopback image backing a non-btrfs data dir sits beside it, never inside it."""
    return data_dir.with_name(data_dir.name + ".btrfs.img")


def setup_storage(size: str) -> str:
    """Make the data directory btrfs. Idempotent. Returns a sentence describing what is in place."""
    data_dir = paths.ensure_dir(paths.data_dir())
    if filesystem_type(data_dir) == "btrfs":
        if reflink_works(data_dir):
            return f"{data_dir} is on btrfs and reflinks work"
        raise FcvmError(f"{data_dir} is btrfs but a reflink probe failed", hint="check the mount options")
    if os.geteuid() != 0:
        _log.warning("not root: cannot create a btrfs loopback; disks will be copied in full")
        return f"{data_dir} is {filesystem_type(data_dir)}; plain copies (run as root for btrfs)"
    if shutil.which("mkfs.btrfs") is None:
        _log.warning("mkfs.btrfs is missing (apt-get install btrfs-progs); disks will be copied in full")
        return f"{data_dir} is {filesystem_type(data_dir)}; plain copies (btrfs-progs missing)"
    image = loop_image_path(data_dir)
    if not image.exists():
        proc.run(["truncate", "-s", size, image])
        proc.run(["mkfs.btrfs", "-q", "-L", "fcvm", image])
    # Existing state must survive: mount aside, move the contents in, then mount over the data dir.
    with tempfile.TemporaryDirectory(prefix="fcvm-btrfs-") as staging:
        proc.run(["mount", "-o", "loop", image, staging])
        try:
            clashes = [e.name for e in data_dir.iterdir() if (Path(staging) / e.name).exists()]
            if clashes:
                raise FcvmError(
                    f"{image} and {data_dir} both hold {', '.join(sorted(clashes))}",
                    hint="move one copy away, then run `fcvm setup storage` again",
                )
            for entry in data_dir.iterdir():
                shutil.move(str(entry), staging)
        finally:
            proc.run(["umount", staging])
    proc.run(["mount", "-o", "loop", image, data_dir])
    if not reflink_works(data_dir):
        raise FcvmError(f"mounted {image} at {data_dir} but a reflink probe failed")
    return f"{data_dir} is now a btrfs loopback ({image}, {size}); reflinks work"
