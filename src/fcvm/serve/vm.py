"""Sandboxes as fcvm microVMs: a snapshot template is cloned (`fcvm snapshot run`), an image template booted
(`fcvm podman run`, warm from the snapshot cache where it can be), both detached and owned by this server.

Commands reach the container over the agent's exec channel, but not through `podman exec`, which costs 2-6 s
per call under TCG: the agent runs them in the VM (0.1-0.5 s), where nsenter enters the container's namespaces,
root and working directory, and the command joins the container's cgroup. The container's pid, cgroup and
environment are read once per machine. Each command leads a process group of its own, so a signal reaches
whatever it started.

Every sandbox can pause and fork: clones (and warm starts) run on their own shared copy of the snapshot's
memory, which a snapshot can freeze in turn; they share no pages with their siblings."""

from __future__ import annotations

import asyncio
import struct
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from fcvm.core import log, paths
from fcvm.core.errors import FcvmError, NotFoundError
from fcvm.run.request import RunRequest
from fcvm.serve import connect as c
from fcvm.serve.backend import Machine, NotSnapshottable, UnknownTemplate
from fcvm.serve.envd import valid_env_name
from fcvm.snapshot.description import SnapshotKind
from fcvm.state import Store
from fcvm_wire import exec_proto as ep

_log = log.get("serve")

# The container's main process for an image template: it waits forever and ends at once on SIGTERM.
KEEP_ALIVE = ("/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done")
STOP_GRACE = 2.0
_FRAME_HEADER = struct.Struct(">BI")
_PENDING_MAX = 16

# Run in the VM: the container's pid, its cgroup, then its environment (NUL-separated, as the kernel has it).
_DISCOVER = """for f in /run/containers/storage/overlay-containers/*/userdata/pidfile; do
  p=$(cat "$f") || continue
  [ -n "$p" ] && [ -d "/proc/$p" ] || continue
  echo "$p"
  cut -d: -f3- "/proc/$p/cgroup" | head -n 1
  exec cat "/proc/$p/environ"
done
echo "fcvm: no running container in the VM" >&2
exit 1"""

# Run in the VM under setsid (so the command leads its own process group): report that group, join the
# container's cgroup, enter the container. $1 = the container's pid, $2 = its cgroup, the rest = the command.
_ENTER = """echo "$$" >&2
echo "$$" > "/sys/fs/cgroup$2/cgroup.procs" 2>/dev/null
p=$1
shift 2
exec /usr/bin/nsenter -t "$p" -m -u -i -n -p -C -r -w -- "$@"
"""


@dataclass(frozen=True)
class Container:
    pid: int
    cgroup: str
    env: dict[str, str]


@dataclass
class VmMachine:
    id: str
    name: str
    vsock_uds: Path
    vcpus: int
    mem_mib: int
    disk_mib: int
    snapshottable: bool
    template: str | None  # the snapshot it was cloned from
    container: Container | None = None


class VmExecStream:
    """One exec connection to the agent, read and written from the event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list[tuple[int, bytes]] = []
        self.group = 0

    async def read_group(self) -> None:
        """The first stderr line is the process group the command leads (written by _ENTER)."""
        line = b""
        while b"\n" not in line:
            frame = await self._read()
            if frame is None or frame[0] == ep.EXIT:
                detail = line.decode(errors="replace").strip()[-300:] or "no output"
                raise c.ConnectError(c.Code.UNAVAILABLE, f"the sandbox could not run the command: {detail}")
            kind, payload = frame
            if kind == ep.STDERR:
                line += payload
                if len(line) > 32 and b"\n" not in line[:32]:
                    break
            elif len(self._pending) < _PENDING_MAX:  # _ENTER reports first: more is a broken guest
                self._pending.append(frame)
            else:
                break
        head, _, rest = line.partition(b"\n")
        if not (head.isdigit() and len(head) <= 10 and int(head) > 1):
            raise c.ConnectError(c.Code.INTERNAL, "the sandbox broke the exec protocol")
        self.group = int(head)
        if rest:
            self._pending.insert(0, (ep.STDERR, rest))

    async def _read(self) -> tuple[int, bytes] | None:
        try:
            header = await self._reader.readexactly(_FRAME_HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise ep.ExecProtocolError("exec stream ended inside a frame") from None
        except OSError:
            return None
        kind, length = _FRAME_HEADER.unpack(header)
        if length > ep.MAX_FRAME:
            raise ep.ExecProtocolError(f"exec frame of {length} bytes exceeds {ep.MAX_FRAME}")
        try:
            return kind, await self._reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ep.ExecProtocolError("exec stream ended inside a frame") from None

    async def frame(self) -> tuple[int, bytes] | None:
        if self._pending:
            return self._pending.pop(0)
        return await self._read()

    async def send_stdin(self, data: bytes) -> None:
        self._writer.write(ep.frame(ep.STDIN, data))
        await self._writer.drain()

    async def close_stdin(self) -> None:
        self._writer.write(ep.frame(ep.STDIN_EOF))
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


def _disk_mib(vm_id: str) -> int:
    directory = paths.vm_dir(vm_id)
    try:
        sizes = [f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name != "mem"]
    except OSError:
        return 0
    return sum(sizes) >> 20


class VmBackend:
    def __init__(self, *, boot_timeout: float = 300.0) -> None:
        self.boot_timeout = boot_timeout
        self._containers: dict[str, Container] = {}

    # --- machines --------------------------------------------------------------------------------

    async def start(self, template: str, name: str) -> VmMachine:
        return await asyncio.to_thread(self._start, template, name)

    def _start(self, template: str, name: str) -> VmMachine:
        from fcvm.run.detach import detach

        store = Store()
        snapshot = store.get_snapshot(template)
        clone = snapshot is not None and snapshot.info.get("kind") == SnapshotKind.USER
        if snapshot is not None and clone:
            from fcvm.commands.snapshot_run import clone_request

            request = replace(clone_request(store, snapshot=snapshot.name, name=name, remove=True,
                                            boot_timeout=self.boot_timeout), snapshottable=True)
        else:
            request = self._image_request(template, name, store)
        vm = store.require_vm(detach(request, quiet=True))
        return VmMachine(id=vm.id, name=vm.name, vsock_uds=Path(vm.config["vsock_uds"]),
                         vcpus=request.cpus, mem_mib=request.mem_mib, disk_mib=_disk_mib(vm.id),
                         snapshottable=bool(vm.config.get("machine")),
                         template=snapshot.name if snapshot is not None and clone else None)

    def _image_request(self, image: str, name: str, store: Store) -> RunRequest:
        from fcvm.network import default_mode
        from fcvm.run.warm import choose_start
        from fcvm.storage.images import image_id
        from fcvm.vmm.select import choose_hypervisor

        if any(ch.isspace() for ch in image) or image.startswith("-") or image_id(image) is None:
            raise UnknownTemplate(f"template {image!r} is neither a snapshot nor a local image",
                                  hint="see `fcvm snapshot ls` and `podman images`")
        hypervisor, binary = choose_hypervisor("auto", None)
        request = RunRequest(image=image, name=name, cmd=KEEP_ALIVE, network=default_mode(), hypervisor=hypervisor,
                             firecracker_bin=binary, remove=True, boot_timeout=self.boot_timeout, snapshottable=True)
        return choose_start(request, store)

    async def stop(self, machine: Machine) -> None:
        assert isinstance(machine, VmMachine)
        from fcvm.commands.stop import stop_vm

        try:
            await asyncio.to_thread(stop_vm, Store(), machine.id, STOP_GRACE)
        except NotFoundError:
            pass
        except FcvmError as exc:
            _log.warning("stopping %s failed: %s", machine.name, exc)

    # --- snapshots -------------------------------------------------------------------------------

    async def snapshot(self, machine: Machine, tag: str) -> None:
        assert isinstance(machine, VmMachine)
        if not machine.snapshottable:
            raise NotSnapshottable(f"sandbox machine {machine.name} is a clone, whose memory is private: it cannot "
                                   "be snapshotted (so it cannot pause or fork)")
        from fcvm.snapshot.create import create_snapshot

        def take() -> None:
            store = Store()
            create_snapshot(store, store.require_vm(machine.id), tag)

        await asyncio.to_thread(take)

    async def remove_snapshot(self, tag: str) -> bool:
        from fcvm.commands.snapshot_rm import remove_snapshot, users

        def remove() -> bool:
            store = Store()
            if store.get_snapshot(tag) is None:
                return True
            if users(store, tag):
                return False
            remove_snapshot(store, tag, force=False)
            return True

        return await asyncio.to_thread(remove)

    def snapshots(self) -> set[str]:
        return {s.name for s in Store().list_snapshots() if s.info.get("kind") == SnapshotKind.USER}

    # --- commands --------------------------------------------------------------------------------

    async def _open(self, machine: VmMachine, argv: list[str], *, stdin: bool) -> VmExecStream:
        from fcvm.commands.exec_ import _open

        request = ep.ExecRequest(id=uuid.uuid4().hex, argv=argv, target="vm", interactive=stdin)
        try:
            sock = await asyncio.to_thread(_open, machine.vsock_uds, request)
        except FcvmError as exc:
            raise c.ConnectError(c.Code.UNAVAILABLE, str(exc)) from None
        reader, writer = await asyncio.open_connection(sock=sock)
        return VmExecStream(reader, writer)

    async def _container(self, machine: VmMachine) -> Container:
        """Read once per machine; clones of one snapshot share it (restored memory: the same pid and all)."""
        if machine.container is None and machine.template is not None:
            machine.container = self._containers.get(machine.template)
        if machine.container is not None:
            return machine.container
        stream = await self._open(machine, ["/bin/sh", "-c", _DISCOVER], stdin=False)
        out, err, code = bytearray(), bytearray(), None
        try:
            while (frame := await stream.frame()) is not None:
                kind, payload = frame
                if kind == ep.EXIT:
                    code = ep.parse_exit(payload)
                    break
                (out if kind == ep.STDOUT else err).extend(payload)
                if len(out) + len(err) > 1 << 20:
                    break
        finally:
            stream.close()
        pid, _, rest = bytes(out).partition(b"\n")
        cgroup, _, environ = rest.partition(b"\n")
        if code != 0 or not pid.isdigit():
            detail = err.decode(errors="replace").strip()[-300:] or f"exit code {code}"
            raise c.ConnectError(c.Code.UNAVAILABLE, f"the sandbox's container is not running: {detail}")
        env = {}
        for entry in environ.split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep and valid_env_name(key):
                env[key] = value
        machine.container = Container(int(pid), cgroup.decode(errors="replace"), env)
        if machine.template is not None:
            self._containers[machine.template] = machine.container
        return machine.container

    async def exec(self, machine: Machine, argv: list[str], env: dict[str, str], *, stdin: bool) -> VmExecStream:
        assert isinstance(machine, VmMachine)
        container = await self._container(machine)
        full_env = {**container.env, **env}
        vm_argv = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in full_env.items()),
                   "/usr/bin/setsid", "-w", "/bin/sh", "-c", _ENTER, "fcvm", str(container.pid), container.cgroup,
                   *argv]
        stream = await self._open(machine, vm_argv, stdin=stdin)
        try:
            await stream.read_group()
        except BaseException:
            stream.close()
            raise
        return stream

    async def signal(self, machine: Machine, group: int, signum: int) -> None:
        assert isinstance(machine, VmMachine)
        if group <= 1:  # `kill -1` is every process
            raise c.ConnectError(c.Code.INTERNAL, f"no process group {group} to signal")
        stream = await self._open(machine, ["/bin/sh", "-c", 'kill -"$1" "-$2" 2>/dev/null; exit 0', "fcvm",
                                            str(signum), str(group)], stdin=False)
        try:
            while (frame := await stream.frame()) is not None and frame[0] != ep.EXIT:
                pass
        finally:
            stream.close()
