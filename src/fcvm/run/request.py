"""What `fcvm podman run` was asked to do, validated: the request the supervisor (and a detached child) runs."""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcvm.core.errors import UsageError
from fcvm.core.kinds import NetworkMode, VmmKind
from fcvm.network.ports import PortMapping
from fcvm.snapshot.cache import CacheLevel
from fcvm.vmm.base import MemBackend

# podman's rule for container names; it also keeps names safe in paths, logs and terminals.
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_NAME_MAX = 64
SUPERVISOR_LOG = "supervisor.log"  # a detached run's own output, in the VM's log directory


def validate_name(name: str) -> str:
    if len(name) > _NAME_MAX or not _NAME.fullmatch(name):
        raise UsageError(f"invalid VM name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter "
                         f"or digit, at most {_NAME_MAX} characters")
    return name


def generate_name() -> str:
    return f"vm-{secrets.token_hex(3)}"


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """`-e KEY=VALUE` (or `-e KEY`, taking the value from our environment, as podman does)."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            raise UsageError(f"-e {pair!r} must be KEY=VALUE")
        env[key] = value if sep else os.environ.get(key, "")
    return env


@dataclass(frozen=True)
class VolumeMap:
    host_dir: Path
    guest_path: str
    read_only: bool

    @classmethod
    def parse(cls, spec: str) -> VolumeMap:
        parts = spec.split(":")
        read_only = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            read_only = parts.pop() == "ro"
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UsageError(f"--map {spec!r} must be HOSTDIR:GUESTDIR[:ro]")
        host_dir = Path(parts[0]).expanduser().resolve()
        if not host_dir.is_dir():
            raise UsageError(f"--map {spec!r}: {host_dir} is not a directory")
        if not parts[1].startswith("/"):
            raise UsageError(f"--map {spec!r}: the guest path must be absolute")
        return cls(host_dir, parts[1], read_only)


@dataclass(frozen=True)
class RunRequest:
    image: str
    name: str
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    publish: tuple[PortMapping, ...] = ()
    maps: tuple[VolumeMap, ...] = ()
    network: NetworkMode = NetworkMode.BRIDGED
    allow_host_loopback: bool = False  # the guest reaches the host's 127.0.0.1 at its gateway address
    hypervisor: VmmKind = VmmKind.QEMU
    firecracker_bin: Path | None = None
    jailer: Path | None = None  # the jailer binary, when Firecracker runs jailed
    cpus: int = 2
    mem_mib: int = 1024
    health_url: str | None = None
    user: str = ""
    workdir: str = ""
    kernel: Path | None = None
    initrd: Path | None = None
    remove: bool = False
    boot_timeout: float = 300.0  # until the container runs; TCG guests are slow, but never wait forever
    echo_output: bool = True  # foreground: container stdout/stderr go to ours
    # A clone: restore this snapshot instead of booting, its memory from the file or from a page server.
    snapshot: str | None = None
    memory: MemBackend = MemBackend.FILE
    serve_id: str | None = None  # the page server's row (Uffd)
    warm: CacheLevel | None = None  # a `podman run` restored from this level of the snapshot cache
    use_cache: bool = True  # --no-snapshot: neither restore from the cache nor add to it
    snapshottable: bool = False  # a QEMU clone on its own shared copy of the memory, so it can be snapshotted

    def __post_init__(self) -> None:
        validate_name(self.name)

    def to_json(self) -> str:
        """The whole request, for a detached child (on its stdin: env values never reach a command line)."""
        data: dict[str, Any] = asdict(self)
        for key in ("firecracker_bin", "jailer", "kernel", "initrd"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["maps"] = [{"host_dir": str(m.host_dir), "guest_path": m.guest_path, "read_only": m.read_only}
                        for m in self.maps]
        data["publish"] = [m.to_json() for m in self.publish]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> RunRequest:
        data = json.loads(text)
        for key in ("firecracker_bin", "jailer", "kernel", "initrd"):
            data[key] = Path(data[key]) if data[key] is not None else None
        data["memory"] = MemBackend(data["memory"])
        data["warm"] = CacheLevel(data["warm"]) if data["warm"] else None
        data["maps"] = tuple(VolumeMap(Path(m["host_dir"]), m["guest_path"], bool(m["read_only"]))
                             for m in data["maps"])
        data["publish"] = tuple(PortMapping.from_json(m) for m in data["publish"])
        data["cmd"] = tuple(data["cmd"])
        data["network"] = NetworkMode(data["network"])
        data["hypervisor"] = VmmKind(data["hypervisor"])
        return cls(**data)
