"""Tiny local container images for demos and tests (no registry is reachable): built from Debian's
busybox-static with `podman import` into the podman storage of the user running it (root: /var/lib/containers).

- localhost/fcvm-busybox: busybox with every applet linked into /bin; CMD ["/bin/sh"].
- localhost/fcvm-demo-httpd: the same plus /www/index.html; busybox httpd on port 80 in the foreground.

Each image carries a label with the hash of its recipe; a rebuild happens only when that changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fcvm.core import log, proc
from fcvm.guest.assets import digest, sha256_file
from fcvm.guest.debs import busybox_binary

_log = log.get("guest")

BUSYBOX_IMAGE = "localhost/fcvm-busybox"
HTTPD_IMAGE = "localhost/fcvm-demo-httpd"
RECIPE_LABEL = "org.fcvm.demo.recipe"
DEMO_TEXT = "fcvm demo page"
DEMO_PAGE = f"""<!doctype html>
<html><head><title>fcvm</title></head>
<body><h1>{DEMO_TEXT}</h1><p>Served by busybox httpd inside a microVM.</p></body></html>
"""
HTTPD_CMD = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"]
_FORMAT = "demo-images-v1"

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class DemoImage:
    name: str
    changes: tuple[str, ...]  # podman import --change instructions
    files: tuple[tuple[str, str], ...] = ()  # extra (path, text) files


DEMO_IMAGES = (
    DemoImage(BUSYBOX_IMAGE, ('CMD ["/bin/sh"]',)),
    DemoImage(
        HTTPD_IMAGE,
        (f"CMD {json.dumps(HTTPD_CMD)}", "EXPOSE 80", "WORKDIR /www"),
        (("www/index.html", DEMO_PAGE),),
    ),
)


def _podman(storage_root: Path | None) -> list[str]:
    if storage_root is None:
        return ["podman"]
    return ["podman", "--root", str(storage_root / "root"), "--runroot", str(storage_root / "run")]


def _applets(busybox: Path) -> list[str]:
    out = proc.run([busybox, "--list"], timeout=30).stdout.decode()
    return sorted({a.strip() for a in out.split() if a.strip() and "/" not in a and a != "busybox"})


def _add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    info.linkname = link
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def rootfs_tar(busybox: Path, applets: list[str], files: tuple[tuple[str, str], ...]) -> bytes:
    """A minimal busybox root filesystem as an (uncompressed) tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("root", 0o700),
                        ("sys", 0o555), ("tmp", 0o1777), ("var", 0o755), ("www", 0o755)):  # fmt: skip
            _add(tar, d, kind=tarfile.DIRTYPE, mode=mode)
        _add(tar, "bin/busybox", data=busybox.read_bytes(), mode=0o755)
        for applet in applets:
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
        _add(tar, "etc/passwd", data=_PASSWD.encode())
        _add(tar, "etc/group", data=_GROUP.encode())
        for path, text in files:
            _add(tar, path, data=text.encode())
    return buf.getvalue()


def _recipe(image: DemoImage, busybox_sha: str) -> str:
    parts: list[str | bytes] = [_FORMAT, image.name, busybox_sha, *image.changes, _PASSWD, _GROUP]
    for path, text in image.files:
        parts += [path, text]
    return digest(parts)


def _inspect(podman: list[str], name: str) -> tuple[str, str] | None:
    """(image id, recipe label) of an existing image, or None."""
    out = proc.run([*podman, "image", "inspect", name], timeout=60, check=False)
    if out.returncode != 0:
        return None
    try:
        info = json.loads(out.stdout)[0]
    except (ValueError, IndexError):
        return None
    labels = info.get("Labels") or (info.get("Config") or {}).get("Labels") or {}
    return str(info.get("Id", "")), str(labels.get(RECIPE_LABEL, ""))


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    # Podman storage belongs to the user (root's is host-wide) and is shared by all of that user's fcvm data
    # dirs, so there is one lock per user; a per-uid name also keeps users from holding each other's lock file.
    with open(os.path.join(tempfile.gettempdir(), f"fcvm-demo-images-{os.geteuid()}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_demo_images(*, storage_root: Path | None = None, progress: bool = False) -> None:
    """Make sure localhost/fcvm-busybox and localhost/fcvm-demo-httpd exist and are current.
    Fast when they are (two `podman image inspect` calls)."""
    podman = _podman(storage_root)
    busybox = busybox_binary()
    busybox_sha = sha256_file(busybox)
    with _host_lock():
        applets: list[str] | None = None
        for image in DEMO_IMAGES:
            recipe = _recipe(image, busybox_sha)
            existing = _inspect(podman, image.name)
            if existing is not None and existing[1] == recipe:
                _log.debug("%s is current", image.name)
                continue
            if applets is None:
                applets = _applets(busybox)
            with tempfile.TemporaryDirectory(prefix="fcvm-demo-") as tmp:
                tar_path = Path(tmp) / "rootfs.tar"
                tar_path.write_bytes(rootfs_tar(busybox, applets, image.files))
                argv = [*podman, "import"]
                for change in (*image.changes, f"LABEL {RECIPE_LABEL}={recipe}"):
                    argv += ["--change", change]
                proc.run([*argv, "--quiet", tar_path, image.name], timeout=300)
            if existing is not None and existing[0]:
                # The old image lost its tag; drop it unless something still uses it.
                proc.run([*podman, "rmi", existing[0]], timeout=60, check=False)
            if progress:
                print(f"built {image.name}")
            _log.info("built %s", image.name)
