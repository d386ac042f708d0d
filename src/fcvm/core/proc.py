"""Process identity (pid plus start time) and the one helper every external command goes through."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Mapping, Sequence

from fcvm.core import log
from fcvm.core.errors import FcvmError
from fcvm.core.wait import wait_until

# The read commands (`fcvm ls`, `inspect`) use ProcessRef only: subprocess, shlex and signal are imported where
# a process is run or signalled, and /proc is read with plain os calls, not pathlib, so those commands never pay
# for them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import IO, Final

DEVNULL = -3  # subprocess.DEVNULL, spawn's default for stdin


class CommandError(FcvmError):
    """An external command failed; carries its stderr so the user sees why."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        import shlex

        tail = stderr.strip().splitlines()[-5:]
        detail = "; ".join(tail) if tail else "no error output"
        super().__init__(f"{shlex.join(argv)} failed with exit code {returncode}: {detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class SpawnError(FcvmError):
    """A long-lived child could not even be started (no such binary, not executable)."""


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when the pid does not exist."""
    try:  # os calls, not a file object: `fcvm ls` reads this for every VM, and they take half the time
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)  # the line is at most about 1100 bytes (52 numbers and a 16-byte name)
    except ProcessLookupError:  # it exited between open and read
        return None
    finally:
        os.close(fd)
    # The command name may hold spaces and parentheses; fields resume after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when the pid does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _threads_running(pid: int) -> bool:
    """Whether any thread of process `pid` has yet to exit. Its leader shows as a zombie as soon as the leader's
    own thread is done, while the others may still run and hold the process's memory, files and sockets."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any((fields := _stat_fields(f"{pid}/task/{tid}")) and fields[0] not in (b"Z", b"X") for tid in tids)


def _running(pid: int, fields: list[bytes]) -> bool:
    return fields[0] not in (b"Z", b"X") or _threads_running(pid)


def _group_members(pgid: int) -> dict[ProcessRef, bool]:
    """Every process whose group is `pgid`, zombies too (they still hold the group's id), each with whether it
    still runs."""
    members = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(name)
            if fields and int(fields[2]) == pgid:
                pid = int(name)
                members[ProcessRef(pid, int(fields[19]))] = _running(pid, fields)
    return members


def group_of(leader: ProcessRef) -> frozenset[ProcessRef]:
    """The processes in the group `leader` leads: the proof `kill_group` needs that the group is ours. Empty when
    `leader` is gone (its pid may now lead a stranger's group) or leads no group."""
    members = _group_members(leader.pid)
    return frozenset(members) if leader in members else frozenset()


def kill_group(pgid: int, known: Collection[ProcessRef], timeout: float = 5.0) -> bool:
    """SIGKILL process group `pgid` and wait until none of it runs, for as long as it is provably the group that
    `known` (processes seen in it) belong to. True once nothing of it runs.

    A group's id is its leader's pid, and the kernel hands that number out again only once no process is left
    in the group. So while a process we saw in the group is still in it, the group is ours, and so is every
    other member (it joined while the group was ours). Once none is, the id may be a stranger's: a reboot or pid
    reuse gives dead VMs' pids to unrelated processes, which must never be signalled."""
    proven = frozenset(known)

    def done() -> bool:
        nonlocal proven
        members = _group_members(pgid)
        if proven.isdisjoint(members) or not any(members.values()):
            return True
        proven = frozenset(members)
        import signal

        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        return False

    if wait_until(done, timeout, interval=0.01):
        return True
    log.get("proc").warning("process group %d: %s still running %.0fs after SIGKILL", pgid,
                 [ref.pid for ref, running in _group_members(pgid).items() if running and ref in proven], timeout)
    return False


class ProcessRef:
    """A process that cannot be confused with a later one that reuses its pid. A value: equal, and hashing alike,
    when pid and start time are. A plain class, not a dataclass: importing dataclasses would cost every `fcvm ls`
    about 8 ms, almost as much as the bare interpreter's start."""

    __slots__ = ("pid", "start")

    def __init__(self, pid: int, start: int) -> None:
        self.pid: Final = pid
        self.start: Final = start

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessRef) and (self.pid, self.start) == (other.pid, other.start)

    def __hash__(self) -> int:
        return hash((self.pid, self.start))

    def __repr__(self) -> str:
        return f"ProcessRef(pid={self.pid}, start={self.start})"

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        started = start_time(pid)
        if started is None:
            raise ProcessLookupError(pid)
        return cls(pid, started)

    @classmethod
    def self(cls) -> ProcessRef:
        return cls.of(os.getpid())

    def alive(self) -> bool:
        """Still running: the same process (start time), and not a zombie whose every thread has exited."""
        fields = _stat_fields(self.pid)
        return fields is not None and int(fields[19]) == self.start and _running(self.pid, fields)

    def signal(self, sig: int) -> bool:
        """Send `sig` only if this is still the same process; True if it was sent."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def terminate(self, timeout: float = 10.0) -> bool:
        """SIGTERM, wait up to `timeout`, then SIGKILL. True once it no longer runs (False: not even SIGKILL
        ended it within 5 s, e.g. it is stuck in the kernel)."""
        import signal

        if not self.signal(signal.SIGTERM):
            return True
        if wait_until(lambda: not self.alive(), timeout, interval=0.05):
            return True
        self.signal(signal.SIGKILL)
        return wait_until(lambda: not self.alive(), 5, interval=0.01)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float | None = 120,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run an external tool: log it, capture stderr into the error, enforce a timeout."""
    import shlex
    import subprocess

    args = [os.fspath(a) for a in argv]
    log.get("proc").debug("run: %s", shlex.join(args))
    full_env = None if env is None else {**os.environ, **env}
    try:
        result = subprocess.run(
            args,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise FcvmError(f"{args[0]} is not installed", hint="run `fcvm doctor` to see what is missing") from exc
    except subprocess.TimeoutExpired as exc:
        raise FcvmError(f"{shlex.join(args)} timed out after {timeout} s") from exc
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, (result.stderr or b"").decode(errors="replace"))
    return result


class Child:
    """A long-lived child process and the one way to end it: SIGTERM, SIGKILL after a grace period, then its
    whole process group (when it leads one) and the zombie."""

    def __init__(self, popen: subprocess.Popen[bytes], *, own_group: bool) -> None:
        self.popen = popen
        self.own_group = own_group
        try:
            self.ref = ProcessRef.of(popen.pid)
        except ProcessLookupError:  # it died already and nobody reaped it yet: the pid is still ours
            self.ref = ProcessRef(popen.pid, 0)
        self._reaped = False
        self._released = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def exited(self) -> bool:
        """True once it is a zombie or gone. Does not reap it, so its pid (and group id) stay reserved."""
        if self._reaped:
            return True
        try:
            return os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it has exited (then reaped, with its group), or None after `timeout`."""
        if timeout is None:
            wait_until(self.exited, float("inf"), interval=0.05)
        elif not wait_until(self.exited, timeout, interval=0.05):
            return None
        return self.reap()

    def reap(self) -> int:
        if not self._reaped:
            if self.own_group:  # what it spawned (fc-mock's QEMU) goes with it
                # Not reaped yet, so its pid, and with it the group's id, cannot have been handed out again.
                kill_group(self.popen.pid, _group_members(self.popen.pid))
            self.popen.wait()
            self._reaped = True
        assert self.popen.returncode is not None
        return self.popen.returncode

    def signal(self, sig: int) -> None:
        if not self.exited():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def release(self) -> None:
        """Let it outlive us (a detached supervisor): stopping it becomes a no-op."""
        self._released = True

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, SIGKILL if it is still running after `grace` seconds, then reap."""
        import signal

        if self._released:
            return
        if not self.exited():
            self.signal(signal.SIGTERM)
            if not wait_until(self.exited, grace, interval=0.05):
                self.signal(signal.SIGKILL)
        self.reap()


@contextlib.contextmanager
def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: int | IO[bytes] | None = DEVNULL,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    own_group: bool = True,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    stop_grace: float = 5.0,
) -> Iterator[Child]:
    """Start a long-lived child; leaving the block stops it (`Child.stop`), whatever happened inside.

    `own_group` puts it in a session of its own: a terminal's Ctrl-C reaches fcvm, which shuts down in order,
    and cleanup can kill everything the child spawned. Objects that hold a child across calls enter this into
    a `contextlib.ExitStack` and close the stack to stop it.
    """
    import shlex
    import subprocess

    args = [os.fspath(a) for a in argv]
    log.get("proc").debug("spawn: %s", shlex.join(args))
    try:
        popen = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=own_group,
                                 pass_fds=tuple(pass_fds), env=None if env is None else {**os.environ, **env})
    except OSError as exc:
        raise SpawnError(f"cannot run {args[0]}: {exc.strerror or exc}") from exc
    child = Child(popen, own_group=own_group)
    try:
        yield child
    finally:
        child.stop(stop_grace)
