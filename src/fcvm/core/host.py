"""Facts about the host that several commands need (doctor, the hypervisor choice, the run path)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    detail: str


def kvm_status() -> KvmStatus:
    """Can /dev/kvm boot a standard guest kernel? Nested PVM cannot, so it does not count."""
    device = Path("/dev/kvm")
    if not device.exists():
        return KvmStatus(False, "/dev/kvm does not exist")
    if not os.access(device, os.R_OK | os.W_OK):
        return KvmStatus(False, "/dev/kvm is not accessible to this user")
    if Path("/sys/module/kvm_pvm").exists():
        return KvmStatus(False, "/dev/kvm is nested PVM (kvm_pvm): standard guest kernels do not boot under it")
    vendor = next((m for m in ("kvm_intel", "kvm_amd") if Path(f"/sys/module/{m}").exists()), None)
    if vendor is None:
        return KvmStatus(False, "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded")
    return KvmStatus(True, f"/dev/kvm via {vendor}")


def device_usable(path: str) -> tuple[bool, str]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{path} does not exist"
    except OSError as exc:
        return False, f"{path}: {exc.strerror}"
    os.close(fd)
    return True, f"{path} opens read-write"


def which(*names: str) -> str | None:
    return next((found for name in names if (found := shutil.which(name))), None)
