"""Sandboxes as E2B has them, over a Backend's machines: a template is a snapshot or an image, a sandbox a running
machine with an id, an access token and a time to live; pause is a snapshot plus a stop, resume a clone of that
snapshot under the same id; fork is a snapshot of the live machine and clones of it.

Every sandbox belongs to this server: they are killed when it stops. Snapshots taken for pause and fork are
the server's own and removed once no machine uses them; snapshots taken by `create_snapshot` are templates
and stay."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from fcvm.core import log
from fcvm.core.errors import FcvmError, UsageError
from fcvm.run.request import validate_name
from fcvm.serve.backend import Backend, Machine, NotSnapshottable, UnknownTemplate
from fcvm.serve.process import ProcessTable

_log = log.get("serve")

DEFAULT_TIMEOUT = 300
MAX_TIMEOUT = 86_400  # E2B's longest sandbox life
MAX_FORKS = 20  # what the SDK itself allows per call
DEFAULT_TEMPLATE = "base"  # what the SDK asks for when given no template
_ID_ALPHABET = string.ascii_lowercase + string.digits
_REAP_INTERVAL = 1.0


class SandboxState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"


class SandboxError(Exception):
    """A control-plane failure, with the HTTP status E2B answers it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def new_sandbox_id() -> str:
    """E2B's form: 20 lowercase letters and digits (no '-': its proxy splits hosts on it)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def check_timeout(value: object, what: str = "timeout") -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TIMEOUT):
        raise SandboxError(400, f"{what} must be whole seconds from 0 to {MAX_TIMEOUT}")
    return value


@dataclass
class Sandbox:
    id: str
    template_id: str
    token: str
    metadata: dict[str, str]
    envs: dict[str, str]
    started_at: float
    end_at: float
    auto_pause: bool
    machine: Machine | None
    processes: ProcessTable | None
    state: SandboxState = SandboxState.RUNNING
    pause_tag: str | None = None
    stopping: asyncio.Task[None] | None = None  # the machine it had last, still shutting down
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    vcpus: int = 0
    mem_mib: int = 0
    disk_mib: int = 0

    @property
    def vm_name(self) -> str:
        return f"e2b-{self.id}"

    def attach(self, backend: Backend, machine: Machine) -> None:
        self.machine = machine
        self.processes = ProcessTable(backend, machine)
        self.state = SandboxState.RUNNING
        self.vcpus, self.mem_mib, self.disk_mib = machine.vcpus, machine.mem_mib, machine.disk_mib

    def detach(self) -> Machine | None:
        machine, self.machine = self.machine, None
        if self.processes is not None:
            self.processes.close()
        self.processes = None
        return machine


class Sandboxes:
    def __init__(self, backend: Backend, *, default_template: str, pool: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.default_template = default_template
        self.pool_size = pool
        self.clock = clock
        self._sandboxes: dict[str, Sandbox] = {}
        self._pool: dict[str, list[Machine]] = {}  # template -> machines started ahead, for the next creates
        self._filling: dict[str, asyncio.Task[None]] = {}
        self._made: dict[str, str] = {}  # snapshot tag -> the sandbox `create_snapshot` took it of
        self._ephemeral: set[str] = set()  # pause and fork snapshots, removed once unused
        self._stopping: set[asyncio.Task[None]] = set()
        self._collecting = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None

    # --- lookup ----------------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise SandboxError(404, f"sandbox {sandbox_id!r} not found")
        return sandbox

    def find(self, sandbox_id: str) -> Sandbox | None:
        return self._sandboxes.get(sandbox_id)

    def all(self) -> list[Sandbox]:
        return sorted(self._sandboxes.values(), key=lambda s: s.started_at)

    # --- lifecycle -------------------------------------------------------------------------------

    async def create(self, template: str, *, timeout: int, metadata: dict[str, str], envs: dict[str, str],
                     auto_pause: bool = False) -> Sandbox:
        source = self.default_template if template == DEFAULT_TEMPLATE else template
        sandbox = Sandbox(id=new_sandbox_id(), template_id=template, token=secrets.token_hex(16),
                          metadata=dict(metadata), envs=dict(envs), started_at=self.clock(), end_at=0.0,
                          auto_pause=auto_pause, machine=None, processes=None)
        began = time.monotonic()
        pooled = self._pool.get(source)
        machine = pooled.pop(0) if pooled else await self._start(source, sandbox.vm_name)
        self._refill(source)
        sandbox.attach(self.backend, machine)
        sandbox.started_at = self.clock()
        sandbox.end_at = sandbox.started_at + timeout
        self._sandboxes[sandbox.id] = sandbox
        _log.info("sandbox %s: %s from %s in %.2f s", sandbox.id, machine.name, source, time.monotonic() - began)
        return sandbox

    def _refill(self, template: str) -> None:
        """Keep `pool_size` machines of a template in use started ahead: a create then only takes one."""
        if self.pool_size > 0 and template not in self._filling:
            self._filling[template] = asyncio.create_task(self._fill(template))

    async def _fill(self, template: str) -> None:
        try:
            while len(self._pool.setdefault(template, [])) < self.pool_size:
                machine = await self.backend.start(template, f"e2b-pool-{secrets.token_hex(4)}")
                self._pool[template].append(machine)
        except FcvmError as exc:
            _log.warning("starting a %s machine ahead failed: %s", template, exc)
        finally:
            del self._filling[template]

    async def _drain(self, template: str | None = None) -> None:
        """Stop the machines started ahead (of one template, or of all)."""
        templates = [template] if template is not None else list(self._pool) + list(self._filling)
        for name in templates:
            filling = self._filling.get(name)
            if filling is not None:
                await asyncio.shield(filling)
            for machine in self._pool.pop(name, []):
                await self.backend.stop(machine)

    async def _start(self, template: str, name: str) -> Machine:
        try:
            return await self.backend.start(template, name)
        except UnknownTemplate as exc:
            raise SandboxError(404, str(exc)) from None
        except FcvmError as exc:
            raise SandboxError(500, f"the sandbox did not start: {exc}") from None

    async def kill(self, sandbox_id: str) -> None:
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            if self._sandboxes.pop(sandbox_id, None) is None:
                raise SandboxError(404, f"sandbox {sandbox_id!r} not found")
            machine = sandbox.detach()
            if sandbox.pause_tag:
                self._ephemeral.add(sandbox.pause_tag)
            if machine is not None:
                self._stop_later(sandbox, machine)
        _log.info("sandbox %s killed", sandbox_id)
        if machine is None:
            await self._collect()

    def _stop_later(self, sandbox: Sandbox, machine: Machine) -> None:
        """Shutting a VM down takes seconds: the sandbox is gone (or paused) at once; resuming it waits."""
        async def stop() -> None:
            try:
                await self.backend.stop(machine)
            except Exception:
                _log.exception("stopping %s failed", machine.name)
            await self._collect()

        task = sandbox.stopping = asyncio.create_task(stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def set_timeout(self, sandbox_id: str, timeout: int) -> None:
        """From now: may shorten the sandbox's life (E2B's `timeout`)."""
        sandbox = self.get(sandbox_id)
        sandbox.end_at = self.clock() + timeout

    def refresh(self, sandbox_id: str, duration: int) -> None:
        """Extend only (E2B's `refreshes`)."""
        sandbox = self.get(sandbox_id)
        sandbox.end_at = max(sandbox.end_at, self.clock() + duration)

    async def connect(self, sandbox_id: str, timeout: int) -> tuple[Sandbox, bool]:
        """A running sandbox's life is only extended; a paused one resumes. Returns (sandbox, resumed)."""
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            self._check_present(sandbox)
            if sandbox.state == SandboxState.RUNNING:
                sandbox.end_at = max(sandbox.end_at, self.clock() + timeout)
                return sandbox, False
            await self._resume(sandbox, timeout)
            return sandbox, True

    async def resume(self, sandbox_id: str, timeout: int) -> Sandbox:
        """The older `resume` route: only a paused sandbox."""
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            self._check_present(sandbox)
            if sandbox.state != SandboxState.PAUSED:
                raise SandboxError(409, f"sandbox {sandbox_id!r} is already running")
            await self._resume(sandbox, timeout)
            return sandbox

    async def _resume(self, sandbox: Sandbox, timeout: int) -> None:
        assert sandbox.pause_tag is not None
        if sandbox.stopping is not None:  # its name is free once the paused machine is gone
            await asyncio.shield(sandbox.stopping)
        machine = await self._start(sandbox.pause_tag, sandbox.vm_name)
        sandbox.attach(self.backend, machine)
        self._ephemeral.add(sandbox.pause_tag)  # the clone maps it: removed once the clone is gone
        sandbox.pause_tag = None
        sandbox.end_at = self.clock() + timeout
        _log.info("sandbox %s resumed", sandbox.id)

    def _check_present(self, sandbox: Sandbox) -> None:
        if self._sandboxes.get(sandbox.id) is not sandbox:  # killed while we waited for its lock
            raise SandboxError(404, f"sandbox {sandbox.id!r} not found")

    async def pause(self, sandbox_id: str) -> None:
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            self._check_present(sandbox)
            if sandbox.state == SandboxState.PAUSED:
                raise SandboxError(409, f"sandbox {sandbox_id!r} is already paused")
            await self._pause(sandbox)

    async def _pause(self, sandbox: Sandbox) -> None:
        assert sandbox.machine is not None
        tag = f"e2b-pause-{sandbox.id}-{secrets.token_hex(3)}"
        await self._snapshot(sandbox.machine, tag)
        machine = sandbox.detach()
        assert machine is not None
        sandbox.state, sandbox.pause_tag = SandboxState.PAUSED, tag
        self._stop_later(sandbox, machine)
        _log.info("sandbox %s paused as %s", sandbox.id, tag)

    async def _snapshot(self, machine: Machine, tag: str) -> None:
        try:
            await self.backend.snapshot(machine, tag)
        except NotSnapshottable as exc:  # not 409: the SDK reads that as "already paused"
            raise SandboxError(400, str(exc)) from None
        except FcvmError as exc:
            raise SandboxError(500, f"snapshot failed: {exc}") from None

    async def snapshot(self, sandbox_id: str, name: str | None) -> str:
        """A named template of the running sandbox: `Sandbox.create(template=name)` clones it."""
        if name is not None:
            try:
                validate_name(name)
            except UsageError as exc:
                raise SandboxError(400, str(exc)) from None
        tag = name or f"snap-{sandbox_id}-{secrets.token_hex(3)}"
        if tag in self.backend.snapshots() or tag in self._ephemeral:
            raise SandboxError(409, f"a snapshot named {tag!r} already exists")
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            self._check_present(sandbox)
            if sandbox.machine is None:
                raise SandboxError(409, f"sandbox {sandbox_id!r} is paused: connect to it first")
            await self._snapshot(sandbox.machine, tag)
        self._made[tag] = sandbox_id
        return tag

    def snapshots(self, sandbox_id: str | None = None) -> list[str]:
        return [tag for tag in sorted(self.backend.snapshots())
                if tag not in self._ephemeral and not any(tag == s.pause_tag for s in self._sandboxes.values())
                and (sandbox_id is None or self._made.get(tag) == sandbox_id)]

    async def delete_snapshot(self, tag: str) -> None:
        if tag not in self.snapshots():
            raise SandboxError(404, f"snapshot {tag!r} not found")
        await self._drain(tag)
        await asyncio.gather(*self._stopping, return_exceptions=True)  # killed sandboxes may still use it
        if not await self.backend.remove_snapshot(tag):
            raise SandboxError(409, f"snapshot {tag!r} is in use by a running sandbox")

    async def fork(self, sandbox_id: str, count: int, timeout: int) -> list[Sandbox | SandboxError]:
        """`count` clones of the live sandbox, each a success or an error of its own; the source runs on."""
        sandbox = self.get(sandbox_id)
        tag = f"e2b-fork-{sandbox_id}-{secrets.token_hex(3)}"
        async with sandbox.lock:
            self._check_present(sandbox)
            if sandbox.machine is None:
                raise SandboxError(409, f"sandbox {sandbox_id!r} is paused: connect to it first")
            await self._snapshot(sandbox.machine, tag)
        self._ephemeral.add(tag)

        async def child() -> Sandbox:
            forked = Sandbox(id=new_sandbox_id(), template_id=sandbox.template_id, token=secrets.token_hex(16),
                             metadata=dict(sandbox.metadata), envs=dict(sandbox.envs), started_at=self.clock(),
                             end_at=0.0, auto_pause=sandbox.auto_pause, machine=None, processes=None)
            forked.attach(self.backend, await self._start(tag, forked.vm_name))
            forked.started_at = self.clock()
            forked.end_at = forked.started_at + timeout
            self._sandboxes[forked.id] = forked
            return forked

        results = await asyncio.gather(*(child() for _ in range(count)), return_exceptions=True)
        await self._collect()
        outcome: list[Sandbox | SandboxError] = []
        for result in results:
            if isinstance(result, Sandbox | SandboxError):
                outcome.append(result)
            elif isinstance(result, Exception):
                outcome.append(SandboxError(500, str(result)))
            else:
                raise result
        return outcome

    # --- time to live ----------------------------------------------------------------------------

    def start_reaper(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(_REAP_INTERVAL)
            await self.reap()

    async def reap(self) -> None:
        """End every running sandbox whose time is up: paused if it asked for that, else killed."""
        now = self.clock()
        for sandbox in [s for s in self._sandboxes.values() if s.state == SandboxState.RUNNING and s.end_at <= now]:
            try:
                if sandbox.auto_pause and sandbox.machine is not None and sandbox.machine.snapshottable:
                    async with sandbox.lock:
                        if sandbox.state == SandboxState.RUNNING and sandbox.end_at <= self.clock():
                            await self._pause(sandbox)
                elif sandbox.end_at <= self.clock():
                    await self.kill(sandbox.id)
            except SandboxError as exc:
                _log.warning("sandbox %s: its time ran out, and ending it failed: %s", sandbox.id, exc.message)

    async def _collect(self) -> None:
        """Remove the server's own snapshots no machine needs any more."""
        async with self._collecting:
            for tag in sorted(self._ephemeral):
                if any(s.pause_tag == tag for s in self._sandboxes.values()):
                    continue
                try:
                    if await self.backend.remove_snapshot(tag):
                        self._ephemeral.discard(tag)
                except FcvmError as exc:
                    _log.warning("snapshot %s: removing it failed: %s", tag, exc)

    async def shutdown(self) -> None:
        """Kill every sandbox, stop the machines started ahead and remove the server's own snapshots."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        self.pool_size = 0
        await self._drain()
        for sandbox in list(self._sandboxes.values()):
            with contextlib.suppress(SandboxError):
                await self.kill(sandbox.id)
        await asyncio.gather(*self._stopping, return_exceptions=True)
        await self._collect()
