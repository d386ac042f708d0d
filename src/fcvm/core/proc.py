"""Process identity (pid plus start time) and the one helper every external command goes through."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fcvm.core import log
from fcvm.core.errors import FcvmError

_log = log.get("proc")


class CommandError(FcvmError):
    """An external command failed; carries its stderr so the user sees why."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-5:]
        detail = "; ".join(tail) if tail else "no error output"
        super().__init__(f"{shlex.join(argv)} failed with exit code {returncode}: {detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when the pid does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses; fields resume after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when the pid does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _live_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (a zombie holds no resources)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and fields[0] != b"Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 5.0) -> None:
    """SIGKILL every process in a group and wait until none runs: kill() returns before death."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (left := _live_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    if left:
        _log.warning("process group %d: %s still running %.0fs after SIGKILL", pgid, left, timeout)


@dataclass(frozen=True)
class ProcessRef:
    """A process that cannot be confused with a later one that reuses its pid."""

    pid: int
    start: int

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
        fields = _stat_fields(self.pid)  # one read: start time and state from the same snapshot
        return fields is not None and int(fields[19]) == self.start and fields[0] != b"Z"

    def signal(self, sig: int) -> bool:
        """Send `sig` only if this is still the same process; True if it was sent."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL."""
        if not self.signal(signal.SIGTERM):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return
            time.sleep(0.05)
        self.signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)


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
    args = [os.fspath(a) for a in argv]
    _log.debug("run: %s", shlex.join(args))
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
