"""The guest kernel: Debian's linux-image-cloud-amd64 -> bzImage (QEMU), vmlinux (Firecracker <= 1.16),
lib/modules (depmod'ed, for the rootfs) and the initramfs.

Layout under `assets_dir()`:
  kernel-<hash>/          hash of (builder, kernel .deb, busybox-static .deb)
      bzImage vmlinux busybox config kernel.json modules/lib/modules/<version>/
  initramfs-<hash>.cpio.gz   hash of (kernel dir, init script, module lists, agent *.py)
Both are built in a temporary sibling and renamed into place, so a killed build leaves nothing that
looks finished. `kernel.json` is written last and its mtime marks the most recently ensured kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fcvm.core import log, paths, proc
from fcvm.core.errors import FcvmError
from fcvm.guest import debs
from fcvm.guest.assets import (
    AssetsNotWritable,
    Steps,
    build_lock,
    building,
    digest,
    read_json,
    remove,
    sha256_file,
    sweep_stale,
    touch,
)
from fcvm.guest.initramfs import agent_sources, build_initramfs, initramfs_name
from fcvm.guest.vmlinux import extract_vmlinux

_log = log.get("guest")

BUILDER = "kernel-v1"
META = "kernel.json"


@dataclass(frozen=True)
class KernelAssets:
    bzimage: Path
    vmlinux: Path
    initramfs: Path
    version: str
    modules: Path  # the extracted lib/modules/<version>, with modules.dep


def kernel_dir_name(deb_sha256: str, busybox_sha256: str) -> str:
    return f"kernel-{digest([BUILDER, deb_sha256, busybox_sha256])}"


def _meta(kdir: Path) -> dict[str, str] | None:
    meta = read_json(kdir / META)
    if meta is None or not isinstance(meta.get("version"), str):
        return None
    for name in ("bzImage", "vmlinux", "busybox"):
        if not (kdir / name).is_file():
            return None
    if not (kdir / "modules" / "lib" / "modules" / meta["version"] / "modules.dep").is_file():
        return None
    return meta


def kernel_dirs() -> list[Path]:
    """Valid kernel directories, the most recently ensured first."""
    root = paths.assets_dir()
    if not root.is_dir():
        return []
    found = [d for d in root.glob("kernel-*") if d.is_dir() and _meta(d) is not None]
    return sorted(found, key=lambda d: (d / META).stat().st_mtime, reverse=True)


def kernel_meta(kdir: Path) -> dict[str, str]:
    meta = _meta(kdir)
    if meta is None:
        raise FcvmError(f"{kdir} is not a complete kernel build", hint="run `fcvm setup kernel`")
    return meta


def _assets(kdir: Path, initramfs: Path) -> KernelAssets:
    version = kernel_meta(kdir)["version"]
    return KernelAssets(
        bzimage=kdir / "bzImage",
        vmlinux=kdir / "vmlinux",
        initramfs=initramfs,
        version=version,
        modules=kdir / "modules" / "lib" / "modules" / version,
    )


def kernel_dir_of(kernel: KernelAssets) -> Path:
    return kernel.bzimage.parent


def _build_kernel_dir(deb: Path, busybox: Path, final: Path, steps: Steps) -> None:
    with building(final) as tmp:
        tmp.mkdir(parents=True)
        steps.step(f"extracting {deb.name}")
        unpacked = tmp / "deb"
        debs.extract(deb, unpacked)
        images = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if len(images) != 1:
            raise FcvmError(f"{deb.name} is not a kernel image package (expected one boot/vmlinuz-*)")
        version = images[0].name.removeprefix("vmlinuz-")
        for base in (unpacked / "lib" / "modules", unpacked / "usr" / "lib" / "modules"):
            if (base / version).is_dir():
                moddir = base / version
                break
        else:
            raise FcvmError(f"{deb.name} ships no lib/modules/{version}")
        target = tmp / "modules" / "lib" / "modules" / version
        target.parent.mkdir(parents=True)
        os.rename(moddir, target)
        os.rename(images[0], tmp / "bzImage")
        config = unpacked / "boot" / f"config-{version}"
        if config.exists():
            os.rename(config, tmp / "config")
        shutil.copyfile(busybox, tmp / "busybox")
        (tmp / "busybox").chmod(0o755)
        remove(unpacked)

        steps.step("resolving module dependencies (depmod)")
        proc.run(["depmod", "-b", tmp / "modules", version], timeout=300)

        steps.step("extracting vmlinux from the LZ4 bzImage")
        (tmp / "vmlinux").write_bytes(extract_vmlinux((tmp / "bzImage").read_bytes()))

        meta = {
            "version": version,
            "deb": deb.name,
            "deb_sha256": sha256_file(deb),
            "busybox_sha256": sha256_file(busybox),
            "builder": BUILDER,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def _initramfs_dirs() -> list[Path]:
    """Where an initramfs is looked up: the assets dir, then the user's own data dir. The initramfs carries this
    fcvm's agent, so a user of shared read-only assets whose fcvm differs from the builder's gets one of their
    own (0.2 s) instead of an error; the kernel and modules stay shared."""
    shared, own = paths.assets_dir(), paths.data_dir() / "assets"
    return [shared] if shared == own else [shared, own]


def _existing_initramfs(name: str) -> Path | None:
    return next((d / name for d in _initramfs_dirs() if (d / name).is_file()), None)


def _ensure_initramfs(kdir: Path, sources: list[tuple[str, bytes]]) -> Path:
    name = initramfs_name(kdir.name, sources)
    existing = _existing_initramfs(name)
    if existing is not None:
        return existing
    shared, *own = _initramfs_dirs()
    try:
        return _build_initramfs(kdir, sources, shared / name)
    except AssetsNotWritable:
        if not own:
            raise
        _log.info("%s is not writable: building this fcvm's initramfs in %s", shared, own[0])
        return _build_initramfs(kdir, sources, own[0] / name)  # build_lock creates the directory


def _build_initramfs(kdir: Path, sources: list[tuple[str, bytes]], final: Path) -> Path:
    with build_lock(final.name, final.parent):
        if final.exists():
            return final
        version = kernel_meta(kdir)["version"]
        with building(final) as tmp:
            plan = build_initramfs(kdir / "modules" / "lib" / "modules" / version, kdir / "busybox", tmp, sources)
        _log.info("initramfs %s: %d modules, agent %d files", final.name, len(plan.order), len(sources))
    return final


def ensure_kernel(kernel_deb: Path | str | None = None, *, progress: bool = True) -> KernelAssets:
    """Build (if missing) the kernel assets for `kernel_deb`, or for Debian's current
    linux-image-cloud-amd64 (downloaded once into the cache; the newest cached one when offline).
    When only the agent changed, only the initramfs is rebuilt."""
    assets = paths.ensure_dir(paths.assets_dir())
    sweep_stale(assets)
    with Steps("kernel", 6, enabled=progress) as steps:
        if kernel_deb is not None:
            deb = Path(kernel_deb)
            if not deb.is_file():
                raise FcvmError(f"kernel package {deb} does not exist")
            steps.step(f"using {deb.name}")
        else:
            steps.step("resolving linux-image-cloud-amd64")
            deb = debs.fetch_kernel_deb(steps.note)
        steps.step("busybox-static")
        busybox = debs.busybox_binary(steps.note)
        kdir = assets / kernel_dir_name(sha256_file(deb), sha256_file(busybox))
        if _meta(kdir) is None:
            with build_lock(kdir.name):
                if _meta(kdir) is None:
                    remove(kdir)
                    _build_kernel_dir(deb, busybox, kdir, steps)
        else:
            steps.step(f"kernel {kdir.name} already built")
        touch(kdir / META)
        steps.step("initramfs")
        initramfs = _ensure_initramfs(kdir, agent_sources())
    result = _assets(kdir, initramfs)
    _log.info("kernel %s: %s", result.version, kdir)
    return result


def find_kernel(*, refresh_initramfs: bool = False) -> KernelAssets | None:
    """The most recently ensured kernel, if its initramfs for the current agent sources exists.
    No download and no build: None means run ensure_kernel / `fcvm setup kernel`. With
    `refresh_initramfs`, a stale initramfs (the agent changed) is rebuilt locally instead (~0.2 s)."""
    dirs = kernel_dirs()
    if not dirs:
        return None
    try:
        sources = agent_sources()
    except FcvmError:
        return None
    initramfs = _existing_initramfs(initramfs_name(dirs[0].name, sources))
    if initramfs is None:
        if not refresh_initramfs:
            return None
        initramfs = _ensure_initramfs(dirs[0], sources)
    return _assets(dirs[0], initramfs)


def host_tsc_khz() -> int:
    """The host TSC frequency in kHz, for `tsc_early_khz=` (without it about one TCG boot in three
    hangs calibrating the TSC against the PIT)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text().strip())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return round(float(value) * 1000)
    raise FcvmError("cannot tell the host TSC frequency (/proc/cpuinfo has no 'cpu MHz')")


def qemu_boot_args() -> str:
    """Kernel command line for the guest under QEMU microvm."""
    return f"console=ttyS0 tsc=reliable tsc_early_khz={host_tsc_khz()} panic=-1 quiet"
