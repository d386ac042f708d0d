"""What every hypervisor backend is given and what it offers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from fcvm.core import paths
from fcvm.core.proc import ProcessRef


@dataclass(frozen=True)
class Drive:
    drive_id: str  # [A-Za-z0-9_], as Firecracker requires
    path: Path
    read_only: bool = False
    root: bool = False


class MemBackend(StrEnum):
    """Where a restored VM's memory comes from (Firecracker's `mem_backend.backend_type`)."""

    FILE = "File"  # the snapshot's memory file, mapped privately: clones share unmodified pages
    UFFD = "Uffd"  # fcvm's page server, over userfaultfd


@dataclass(frozen=True)
class RestoreSpec:
    """Start the VM from a snapshot instead of booting its kernel."""

    state: Path  # the device-state stream
    memory: Path  # the frozen memory file
    backend: MemBackend = MemBackend.FILE
    state_offset: int = 0  # where the stream starts in `state` (fc-mock's snapshot file puts a header first)
    uffd_socket: Path | None = None  # the page server's socket (Uffd)
    preload: Path | None = None  # the QEMU library that hands guest RAM to the page server (Uffd under QEMU)
    vmm_version: str = ""  # the version that took the snapshot: a different one is refused before loading


@dataclass
class MachineSpec:
    """A microVM, independent of the hypervisor that runs it."""

    name: str  # VM name; prefixes console and VMM log lines
    workdir: Path  # sockets, console log; short path (Unix socket names are limited to 108 bytes)
    kernel: Path  # bzImage for QEMU, ELF vmlinux for Firecracker
    initrd: Path | None
    boot_args: str  # full kernel command line, minus what the hypervisor appends itself
    vcpus: int = 2
    mem_mib: int = 1024
    drives: list[Drive] = field(default_factory=list)
    tap: str | None = None  # TAP device inside the VM's network namespace
    guest_mac: str | None = None
    vsock_uds: Path | None = None  # host side of the agent channel, with Firecracker vsock semantics
    guest_cid: int = 3
    enter_argv: list[str] = field(default_factory=list)  # runs the VMM inside the VM's namespaces
    log_dir: Path | None = None  # where console.log goes, if it must outlive `workdir`
    mem_file: Path | None = None  # guest RAM as a shared file (snapshot-capable); None: anonymous memory
    restore: RestoreSpec | None = None
    vmm_uid: int | None = None  # the VMM runs as this uid and gid, with no capabilities; None: as fcvm does

    @property
    def console_log(self) -> Path:
        return (self.log_dir or self.workdir) / paths.CONSOLE_LOG


class Hypervisor(Protocol):
    name: str  # "qemu", "firecracker", "firecracker (fc-mock)"
    marks: dict[str, float]  # time.monotonic() at stages inside start() (e.g. "resumed"), for inspect and bench/

    @property
    def process(self) -> ProcessRef:
        """The VMM process (pid + start time), for the state store and cleanup. It leads its own session and
        process group, so cleanup can also reach what it spawned (fc-mock's QEMU)."""
        ...

    def start(self) -> None:
        """Launch the VMM and boot the guest; return once it runs (not once the guest is up)."""
        ...

    def wait(self, timeout: float | None = None) -> int | None:
        """The VMM's exit code, or None if still running after `timeout`."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the guest and the VMM; idempotent."""
        ...
