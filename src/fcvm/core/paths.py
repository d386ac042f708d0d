"""Where fcvm keeps its state, assets and per-VM runtime files."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "FCVM_DATA_DIR"
ASSETS_DIR_ENV = "FCVM_ASSETS_DIR"


def data_dir() -> Path:
    """`FCVM_DATA_DIR`, else /var/lib/fcvm for root, else $XDG_DATA_HOME/fcvm."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/fcvm")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "fcvm"


def state_db() -> Path:
    return data_dir() / "state.db"


def assets_dir() -> Path:
    """Content-addressed guest assets (kernels, initramfs, rootfs images, image disks).

    `FCVM_ASSETS_DIR` lets several data dirs (e.g. one per test) share one set of built assets."""
    override = os.environ.get(ASSETS_DIR_ENV)
    return Path(override) if override else data_dir() / "assets"


def cache_dir() -> Path:
    """Downloaded inputs (.deb files, apt archives) that make asset builds work offline."""
    return assets_dir().parent / "cache" if os.environ.get(ASSETS_DIR_ENV) else data_dir() / "cache"


def vms_dir() -> Path:
    return data_dir() / "vms"


def vm_dir(vm_id: str) -> Path:
    """Per-VM disks, sockets and logs. Sockets live here too, so keep the path short."""
    return vms_dir() / vm_id


def vm_logs_dir(vm_id: str) -> Path:
    """Console and container output; outlives the VM (and its disk) until `fcvm rm`."""
    return data_dir() / "logs" / vm_id


def ensure_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def snapshots_dir() -> Path:
    """One directory per snapshot: its state stream, memory file, frozen disks and description."""
    return data_dir() / "snapshots"
