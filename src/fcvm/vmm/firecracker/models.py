"""Typed request bodies for the Firecracker API, one dataclass per swagger definition fcvm sends.

Field names are the spec's; `None` means "not sent". `body(version)` drops fields the running
Firecracker does not know yet (see `since` metadata): unknown fields are a 400 in Firecracker.
A field that would change behaviour if silently dropped (`vsock_override`) is an error instead.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from fcvm.core import log
from fcvm.core.errors import FcvmError

_log = log.get("vmm.firecracker")

Version = tuple[int, int]  # (major, minor)

SUPPORTED_MIN: Version = (1, 12)
SUPPORTED_MAX: Version = (1, 16)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")


class UnsupportedFieldError(FcvmError):
    """A request needs a field the running Firecracker version does not accept."""


def parse_version(text: str) -> Version:
    """"1.16.1" or "v1.16.1-dev" -> (1, 16)."""
    match = re.match(r"^v?(\d+)\.(\d+)", text.strip())
    if not match:
        raise FcvmError(f"cannot parse Firecracker version {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_supported(text: str) -> Version:
    version = parse_version(text)
    if not SUPPORTED_MIN <= version <= SUPPORTED_MAX:
        lo, hi = (".".join(map(str, v)) for v in (SUPPORTED_MIN, SUPPORTED_MAX))
        raise FcvmError(
            f"Firecracker {text} is not supported: fcvm supports {lo} to {hi}",
            hint="install a supported release with `fcvm setup firecracker` or pass --firecracker-bin",
        )
    return version


def since(version: Version, *, required: bool = False) -> dict[str, Any]:
    """Field metadata: the field exists from `version` on. `required` fields raise when unsupported;
    the others are dropped with a warning."""
    return {"since": version, "required_when_set": required}


IDENTIFIER = {"identifier": True}  # field metadata: a Firecracker id, checked when the model is built


def _validate_id(kind: str, value: str) -> None:
    if not ID_PATTERN.match(value):
        raise FcvmError(f"invalid Firecracker {kind} {value!r}: use only letters, digits and '_'")


@dataclass
class Model:
    """Base: `body(version)` is the JSON object sent; None fields are omitted. Each model is named after its swagger
    definition, which `definition` gives (for validation in tests and fc-mock)."""

    definition: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.definition = cls.__name__

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata.get("identifier"):
                _validate_id(f.name, getattr(self, f.name))

    def body(self, version: Version | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            min_version = f.metadata.get("since")
            if version is not None and min_version is not None and version < min_version:
                need = ".".join(map(str, min_version))
                have = ".".join(map(str, version))
                if f.metadata.get("required_when_set"):
                    raise UnsupportedFieldError(
                        f"{type(self).__name__}.{f.name} needs Firecracker {need} or newer (this is {have})",
                        hint="upgrade Firecracker with `fcvm setup firecracker`",
                    )
                _log.warning("not sending %s.%s: Firecracker %s lacks it (needs %s)",
                             type(self).__name__, f.name, have, need)
                continue
            out[f.name] = _encode(value, version)
        return out


def _encode(value: Any, version: Version | None) -> Any:
    if isinstance(value, Model):
        return value.body(version)
    if isinstance(value, list):
        return [_encode(v, version) for v in value]
    return value


@dataclass
class TokenBucket(Model):
    size: int
    refill_time: int
    one_time_burst: int | None = None


@dataclass
class RateLimiter(Model):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


@dataclass
class BootSource(Model):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


@dataclass
class MachineConfiguration(Model):
    vcpu_count: int
    mem_size_mib: int
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    huge_pages: Literal["None", "2M"] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.vcpu_count <= 32:
            raise FcvmError(f"Firecracker supports 1 to 32 vCPUs, not {self.vcpu_count}")
        if self.mem_size_mib < 1:
            raise FcvmError(f"memory must be at least 1 MiB, not {self.mem_size_mib}")


@dataclass
class Drive(Model):
    drive_id: str = field(metadata=IDENTIFIER)
    is_root_device: bool
    path_on_host: str | None = None
    is_read_only: bool | None = None
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    rate_limiter: RateLimiter | None = None


@dataclass
class PartialDrive(Model):
    drive_id: str = field(metadata=IDENTIFIER)
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


@dataclass
class NetworkInterface(Model):
    iface_id: str = field(metadata=IDENTIFIER)
    host_dev_name: str
    guest_mac: str | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


@dataclass
class Vsock(Model):
    guest_cid: int
    uds_path: str

    def __post_init__(self) -> None:
        if self.guest_cid < 3:
            raise FcvmError(f"vsock guest_cid must be at least 3, not {self.guest_cid}")


@dataclass
class MmdsConfig(Model):
    network_interfaces: list[str]
    version: Literal["V1", "V2"] | None = "V2"
    ipv4_address: str | None = "169.254.169.254"


@dataclass
class InstanceActionInfo(Model):
    action_type: Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]


@dataclass
class Vm(Model):
    state: Literal["Paused", "Resumed"]


@dataclass
class Logger(Model):
    log_path: str | None = None
    level: Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"] | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None


@dataclass
class Metrics(Model):
    metrics_path: str


@dataclass
class SnapshotCreateParams(Model):
    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


@dataclass
class MemoryBackend(Model):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


@dataclass
class NetworkOverride(Model):
    iface_id: str
    host_dev_name: str


@dataclass
class VsockOverride(Model):
    uds_path: str


@dataclass
class SnapshotLoadParams(Model):
    snapshot_path: str
    mem_backend: MemoryBackend
    track_dirty_pages: bool | None = None
    resume_vm: bool | None = None
    network_overrides: list[NetworkOverride] | None = field(default=None, metadata=since((1, 12)))
    vsock_override: VsockOverride | None = field(default=None, metadata=since((1, 16), required=True))
    clock_realtime: bool | None = field(default=None, metadata=since((1, 16)))


# Endpoint paths, so callers never spell them twice.
BOOT_SOURCE = "/boot-source"
MACHINE_CONFIG = "/machine-config"
VSOCK = "/vsock"
MMDS = "/mmds"
MMDS_CONFIG = "/mmds/config"
ACTIONS = "/actions"
VM = "/vm"
LOGGER = "/logger"
METRICS = "/metrics"
SNAPSHOT_CREATE = "/snapshot/create"
SNAPSHOT_LOAD = "/snapshot/load"
VERSION = "/version"


def drive_path(drive_id: str) -> str:
    _validate_id("drive_id", drive_id)
    return f"/drives/{drive_id}"


def iface_path(iface_id: str) -> str:
    _validate_id("iface_id", iface_id)
    return f"/network-interfaces/{iface_id}"
