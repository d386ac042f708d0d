"""The guest root filesystem: Debian bookworm from mmdebstrap, with podman (crun and runc), python3 and
the kernel's modules, packed into an ext4 image by `mkfs.ext4 -d` (no mount, no loop device).

`assets/rootfs-<hash>.ext4` is named by the recipe (suite, packages, config files) and the kernel
package whose modules it carries. The downloaded .debs stay in `cache_dir()/debs/<suite>`; when the
mirror is unreachable the build runs from that cache as a local repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from fcvm.core import log, paths, proc
from fcvm.core.errors import FcvmError
from fcvm.guest.assets import (
    Steps,
    build_lock,
    digest,
    publish,
    read_json,
    remove,
    sweep_stale,
    tmp_path,
    touch,
)
from fcvm.guest.debs import watch_bytes
from fcvm.guest.kernel import META, KernelAssets, kernel_dir_of, kernel_dirs, kernel_meta

_log = log.get("guest")

BUILDER = "rootfs-v1"
SUITE = "bookworm"
PACKAGES = ("podman", "runc", "crun", "python3", "iproute2", "ca-certificates", "kmod", "util-linux")
IMAGE_SIZE = "2G"
MIRROR_ENV = "FCVM_DEBIAN_MIRROR"  # e.g. http://deb.debian.org/debian (security: <mirror>-security)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

# Keep the image small: no manuals, translations or docs (copyright files stay).
_DPKG_OPTS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

CONTAINERS_CONF = """\
# fcvm guest: no systemd or journald; pure cgroup v2, where crun works.
[containers]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
"""

STORAGE_CONF = """\
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
"""

HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\tfcvm
::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""

# The guest has no init system, so no poweroff/reboot binaries; these do what `poweroff -f` does.
POWEROFF = """\
#!/usr/bin/python3
# fcvm guest: power off (or reboot) at once, like `poweroff -f`; there is no init system to ask.
import ctypes, os, sys
os.sync()
cmd = 0x01234567 if os.path.basename(sys.argv[0]) == "reboot" else 0x4321FEDC
if ctypes.CDLL(None, use_errno=True).reboot(cmd) != 0:
    sys.exit(f"{sys.argv[0]}: {os.strerror(ctypes.get_errno())}")
"""

CONFIG_FILES: dict[str, tuple[str, int]] = {
    "etc/containers/containers.conf": (CONTAINERS_CONF, 0o644),
    "etc/containers/storage.conf": (STORAGE_CONF, 0o644),
    "etc/hostname": ("fcvm\n", 0o644),
    "etc/hosts": (HOSTS, 0o644),
    "etc/resolv.conf": ("", 0o644),  # the agent writes it from the plan
    "usr/local/sbin/poweroff": (POWEROFF, 0o755),
}
_SYMLINKS = {"usr/local/sbin/reboot": "poweroff"}

# mmdebstrap's phases, announced by hooks through a status file.
_PHASES = {
    "download": "downloading packages",
    "extract": "unpacking essential packages",
    "essential": "installing podman, python3, ...",
    "customize": "cleaning up",
}


def deb_cache() -> Path:
    return paths.ensure_dir(paths.cache_dir() / "debs" / SUITE)


def rootfs_name(kernel_deb_sha256: str) -> str:
    parts: list[str | bytes] = [BUILDER, SUITE, " ".join(PACKAGES), IMAGE_SIZE, " ".join(_DPKG_OPTS)]
    for rel, (text, mode) in sorted(CONFIG_FILES.items()):
        parts += [rel, text, oct(mode)]
    parts += [f"{k}->{v}" for k, v in sorted(_SYMLINKS.items())]
    parts.append(kernel_deb_sha256)
    return f"rootfs-{digest(parts)}.ext4"


def _mirrors() -> list[str]:
    base = os.environ.get(MIRROR_ENV, "").rstrip("/")
    main = base or DEFAULT_MIRROR
    security = f"{base}-security" if base else DEFAULT_SECURITY_MIRROR
    return [
        f"deb {main} {SUITE} main",
        f"deb {main} {SUITE}-updates main",
        f"deb {security} {SUITE}-security main",
    ]


def _local_repo(cache: Path) -> list[str]:
    """Index the cached .debs as a flat repository, for building offline."""
    if not any(cache.glob("*.deb")):
        raise FcvmError(
            f"cannot reach the Debian mirror and the package cache ({cache}) is empty",
            hint="build once with network access; later builds work offline",
        )
    packages = proc.run(["dpkg-scanpackages", "--multiversion", "."], cwd=cache, timeout=600).stdout
    (cache / "Packages").write_bytes(packages)
    # mmdebstrap picks the essential set by suite, so the flat repository needs a Release naming it.
    release = (
        f"Suite: {SUITE}\nCodename: {SUITE}\nArchitectures: amd64 all\nComponents: main\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
    )
    (cache / "Release").write_text(release)
    return [f"deb [trusted=yes] copy://{cache.resolve()} ./"]


def _mmdebstrap_argv(root: Path, status: Path, cache: Path, sources: list[str]) -> list[str]:
    q_cache, q_status = shlex.quote(str(cache)), shlex.quote(str(status))
    archives = '"$1"/var/cache/apt/archives'
    sync_in = (
        f"mkdir -p {archives} && for f in {q_cache}/*.deb; do [ -e \"$f\" ] || continue; "
        f'ln "$f" {archives}/ 2>/dev/null || cp "$f" {archives}/; done'
    )
    sync_out = (
        f'for f in {archives}/*.deb; do [ -e "$f" ] || continue; b=$(basename "$f"); '
        f'[ -e {q_cache}/"$b" ] || ln "$f" {q_cache}/"$b" 2>/dev/null || cp "$f" {q_cache}/"$b"; done'
    )
    argv = [
        "mmdebstrap",
        "--mode=unshare" if os.geteuid() == 0 else "--mode=auto",
        "--variant=minbase",
        "--include=" + ",".join(PACKAGES),
        "--skip=download/empty",
        "--skip=essential/unlink",
        "--aptopt=Acquire::Retries \"3\"",
        "--setup-hook=" + sync_in,
        f"--setup-hook=echo download >> {q_status}",
        f"--extract-hook=echo extract >> {q_status}",
        f"--essential-hook=echo essential >> {q_status}",
        "--customize-hook=" + sync_out,
        f"--customize-hook=echo customize >> {q_status}",
    ]
    argv += [f"--dpkgopt={opt}" for opt in _DPKG_OPTS]
    return [*argv, SUITE, str(root), *sources]


@contextlib.contextmanager
def _follow_phases(status: Path, root: Path, steps: Steps) -> Iterator[None]:
    """Turn the hooks' status lines (and the bytes in apt's download directory) into progress."""
    stop = threading.Event()
    seen: list[str] = []
    downloaded = [0]

    def loop() -> None:
        while not stop.wait(0.3):
            with contextlib.suppress(OSError):
                for word in status.read_text().split()[len(seen) :]:
                    seen.append(word)
                    if word in _PHASES:
                        steps.step(_PHASES[word])
            if seen and seen[-1] == "download" and downloaded[0]:
                steps.note(f"{_PHASES['download']} ({downloaded[0] / 1e6:.0f} MB)")

    def report(total: int) -> None:
        downloaded[0] = total

    thread = threading.Thread(target=loop, name="mmdebstrap-progress", daemon=True)
    thread.start()
    try:
        with watch_bytes(root / "var" / "cache" / "apt" / "archives", report):
            yield
    finally:
        stop.set()
        thread.join(timeout=2)


def _copy_modules(kernel: KernelAssets, root: Path) -> None:
    # bookworm is merged-/usr: /lib is a symlink to usr/lib.
    dest = root / "usr" / "lib" / "modules" / kernel.version
    remove(dest)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(kernel.modules, dest, copy_function=link_or_copy, symlinks=True)


def _configure(root: Path) -> None:
    for rel, (text, mode) in CONFIG_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()  # e.g. a resolv.conf symlink
        path.write_text(text)
        path.chmod(mode)
    for rel, target in _SYMLINKS.items():
        link = root / rel
        remove(link)
        link.symlink_to(target)
    (root / "opt" / "fc-agent").mkdir(parents=True, exist_ok=True)
    for leftover in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        leftover.unlink()


def _build(kernel: KernelAssets, final: Path, steps: Steps) -> None:
    if os.geteuid() != 0:
        raise FcvmError(
            "building the guest rootfs needs root (file ownership must be real for mkfs.ext4 -d)",
            hint="run `sudo fcvm setup rootfs`",
        )
    work = tmp_path(final.with_name(final.name + ".build"))
    remove(work)
    work.mkdir(parents=True)
    cache = deb_cache()
    try:
        root, status = work / "root", work / "status"
        attempts: list[tuple[str, list[str]]] = [("mirror", _mirrors())]
        if any(cache.glob("*.deb")):
            attempts.append(("package cache", []))
        last_error: FcvmError | None = None
        for label, sources in attempts:
            remove(root)
            status.write_text("")
            if not sources:
                _log.warning("the Debian mirror failed (%s); building from the package cache", last_error)
                sources = _local_repo(cache)
            steps.step(f"mmdebstrap {SUITE} from the {label}")
            try:
                with _follow_phases(status, root, steps):
                    proc.run(_mmdebstrap_argv(root, status, cache, sources), timeout=1800)
                break
            except FcvmError as exc:
                last_error = exc
        else:
            assert last_error is not None
            raise last_error
        steps.step("configuring (containers.conf, kernel modules)")
        _copy_modules(kernel, root)
        _configure(root)
        steps.step(f"mkfs.ext4 -d ({IMAGE_SIZE})")
        image = work / "rootfs.ext4"
        proc.run(
            ["mkfs.ext4", "-q", "-F", "-L", "fcvm-root", "-m", "0", "-E", "root_owner=0:0",
             "-d", root, image, IMAGE_SIZE],
            timeout=600,
        )  # fmt: skip
        publish(image, final)
    finally:
        remove(work)


def _kernel_deb_sha(kernel: KernelAssets) -> str:
    meta = read_json(kernel_dir_of(kernel) / META) or kernel_meta(kernel_dir_of(kernel))
    return str(meta["deb_sha256"])


def ensure_rootfs(kernel: KernelAssets, *, progress: bool = True) -> Path:
    """The base ext4 image for `kernel` (built if missing; under a minute with a warm cache)."""
    assets = paths.ensure_dir(paths.assets_dir())
    sweep_stale(assets)
    final = assets / rootfs_name(_kernel_deb_sha(kernel))
    if not final.exists():
        with build_lock(final.name), Steps("rootfs", 7, enabled=progress) as steps:
            if not final.exists():
                _build(kernel, final, steps)
    touch(final)
    _log.info("rootfs %s", final)
    return final


def find_rootfs() -> Path | None:
    """The base image for the most recently ensured kernel, if built (no build)."""
    dirs = kernel_dirs()
    if not dirs:
        return None
    meta = read_json(dirs[0] / META) or {}
    sha = meta.get("deb_sha256")
    if not isinstance(sha, str):
        return None
    image = paths.assets_dir() / rootfs_name(sha)
    return image if image.is_file() else None
