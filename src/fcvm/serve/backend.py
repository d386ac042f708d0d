"""What `fcvm serve` needs from the machines behind its sandboxes. The VM backend (serve/vm.py) runs them as fcvm
microVMs; the unit tests drive the same server through a stand-in that runs commands on the host."""

from __future__ import annotations

from typing import Protocol

from fcvm.core.errors import FcvmError


class UnknownTemplate(FcvmError):
    """Neither a snapshot nor a local image of that name."""


class NotSnapshottable(FcvmError):
    """The machine cannot be snapshotted (a QEMU clone: its RAM is private), so it cannot pause or fork."""


class ExecStream(Protocol):
    """One command running in a machine's container, as the frames of fcvm_wire.exec_proto (STDOUT, STDERR,
    EXIT). `group` is the process group the command leads, for signals."""

    group: int

    async def frame(self) -> tuple[int, bytes] | None:
        """The next frame, or None once the connection ended."""
        ...

    async def send_stdin(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    def close(self) -> None: ...


class Machine(Protocol):
    name: str
    vcpus: int
    mem_mib: int
    disk_mib: int
    snapshottable: bool


class Backend(Protocol):
    async def start(self, template: str, name: str) -> Machine:
        """A running machine from `template`: a snapshot (cloned) or a local image (booted). Raises
        UnknownTemplate, or FcvmError when it fails to start."""
        ...

    async def stop(self, machine: Machine) -> None: ...

    async def snapshot(self, machine: Machine, tag: str) -> None:
        """Snapshot the running machine under `tag`; it runs on. Raises NotSnapshottable."""
        ...

    async def remove_snapshot(self, tag: str) -> bool:
        """Remove the snapshot; False while a machine still uses it (it is left for a later try)."""
        ...

    def snapshots(self) -> set[str]:
        """The tags of the user snapshots there are (templates)."""
        ...

    async def exec(self, machine: Machine, argv: list[str], env: dict[str, str], *, stdin: bool) -> ExecStream:
        """Run `argv` as root in the machine's container, in its working directory, with the container's
        environment plus `env`; stdin is open only when asked for."""
        ...

    async def signal(self, machine: Machine, group: int, signum: int) -> None:
        """Send `signum` to every process of the group an ExecStream reported."""
        ...
