"""What a snapshot holds and the machine a clone must rebuild exactly: `snapshot.json` beside the state stream,
the frozen memory file and the frozen writable disks.

A restore into a machine that differs (vCPUs, memory, devices, their order, the QEMU version) fails deep in
QEMU with an obscure message, or worse; so the description is checked first and a mismatch is a clear error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fcvm.core.errors import FcvmError
from fcvm.core.kinds import NetworkMode, VmmKind
from fcvm_wire import credential as credential_wire

DESCRIPTION_FILE = "snapshot.json"
FORMAT_VERSION = 1


class SnapshotKind(StrEnum):
    USER = "user"  # `fcvm snapshot create`
    CACHE = "cache"  # taken automatically to start later runs warm


class SnapshotError(FcvmError):
    pass


@dataclass(frozen=True)
class DriveRecord:
    drive_id: str
    read_only: bool
    root: bool
    path: str  # a shared read-only asset's absolute path, or the frozen copy's file name inside the snapshot
    baked_path: str = ""  # where the source VM had it: a Firecracker snapshot reopens the drive there on load


@dataclass(frozen=True)
class VolumeRecord:
    host_dir: str
    guest_path: str
    read_only: bool


@dataclass(frozen=True)
class SnapshotDescription:
    hypervisor: VmmKind
    vmm_version: str  # QEMU's version, or Firecracker's: a restore needs the same
    vcpus: int
    mem_mib: int
    drives: tuple[DriveRecord, ...]
    guest_mac: str
    tap: str
    image: str
    network_mode: NetworkMode
    source_vm: str
    kernel: str = ""  # what the source booted; a Firecracker snapshot/load does not need it, QEMU neither
    initrd: str = ""
    volumes: tuple[VolumeRecord, ...] = ()
    cmd: tuple[str, ...] = ()
    agent_credential: str = ""  # the agent proves itself with this on every host listener; clones keep it
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        path = directory / DESCRIPTION_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        path.chmod(0o600)

    @classmethod
    def read(cls, directory: Path) -> SnapshotDescription:
        path = directory / DESCRIPTION_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FORMAT_VERSION:
                raise SnapshotError(f"{path}: snapshot format {data.get('format_version')} is not "
                                    f"{FORMAT_VERSION}; take the snapshot again with this fcvm")
            data["hypervisor"] = VmmKind(data["hypervisor"])
            data["network_mode"] = NetworkMode(data["network_mode"])
            data["drives"] = tuple(DriveRecord(**d) for d in data["drives"])
            data["volumes"] = tuple(VolumeRecord(**v) for v in data["volumes"])
            data["cmd"] = tuple(data["cmd"])
            credential_wire.from_hex(data["agent_credential"])  # without it a clone's host side cannot hear its agent
            return cls(**data)
        except FileNotFoundError:
            raise SnapshotError(f"{path} is missing: the snapshot is incomplete") from None
        except credential_wire.CredentialError as exc:
            raise SnapshotError(f"{path}: {exc}, so a clone could not hear its agent",
                                hint="take the snapshot again with this fcvm") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise SnapshotError(f"{path} is damaged: {exc}") from None

    def drive_path(self, directory: Path, drive: DriveRecord) -> Path:
        return Path(drive.path) if drive.read_only else directory / drive.path

    def check_files(self, directory: Path, memory: Path, state: Path) -> None:
        """Every file a restore needs exists and the memory file is whole; else a clear error."""
        for needed in (state, memory, *(self.drive_path(directory, d) for d in self.drives)):
            if not needed.is_file():
                raise SnapshotError(f"snapshot file {needed} is missing")
        size = memory.stat().st_size
        if size != self.mem_mib << 20:
            raise SnapshotError(f"the snapshot's memory file {memory} has {size} bytes, not the guest's "
                                f"{self.mem_mib} MiB: it was truncated or replaced")
