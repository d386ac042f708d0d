"""An exec in the container through crun itself, with the container's own process spec.

`podman exec` spends most of a second starting podman in the guest, and (podman 4.3) sizes a `-t` terminal only
after the command started, so a command that reads its size at once sees 0x0 (containers/podman#10710). `crun exec`
with the container's process (user, groups, capabilities, rlimits, cwd, env) starts in a fifth of the time: crun
itself applies the container's seccomp profile, namespaces and cgroup, and creates the terminal at the size asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from fcvm_wire import exec_proto as ep

# Podman's answers when the runtime cannot start the command, so scripts see what `podman exec` gives.
EXIT_RUNTIME_ERROR = 125
EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127
# crun exits 255 when it fails itself; so may the command, which is told apart by crun's log staying empty.
_CRUN_FAILED = 255
_RUNTIME_STATE = Path("/run/crun")  # crun's default root, where podman (runtime = "crun") keeps the container
_SCRATCH = Path("/run/fc-agent/exec")
_CONSOLE_POLL = 0.05


class ExecUnavailable(RuntimeError):
    pass


def process_spec(container_config: dict[str, object], request: ep.ExecRequest) -> dict[str, object]:
    """The container's process with the request's command, environment and terminal."""
    base = container_config.get("process")
    if not isinstance(base, dict):
        raise ExecUnavailable("the container's config has no process")
    overridden = set(request.env)
    env = [entry for entry in base.get("env", []) if entry.split("=", 1)[0] not in overridden]
    env += [f"{key}={value}" for key, value in request.env.items()]
    spec: dict[str, object] = {**base, "args": request.argv, "env": env, "terminal": request.tty}
    spec.pop("consoleSize", None)
    if request.tty:
        spec["consoleSize"] = {"height": request.rows, "width": request.cols}
    return spec


def exit_code(returncode: int, crun_log: str) -> int:
    """The exit code `podman exec` would give: the command's own, or 125/126/127 when crun could not start it."""
    if returncode != _CRUN_FAILED or not crun_log.strip():
        return returncode
    error = crun_log.lower()
    if "not found" in error or "no such file" in error:
        return EXIT_NOT_FOUND
    if "permission denied" in error or "not permitted" in error:
        return EXIT_CANNOT_INVOKE
    return EXIT_RUNTIME_ERROR


class Execution:
    """The scratch files of one `crun exec`: process spec, crun's log, the command's pid, the console socket."""

    def __init__(self, container_id: str, request: ep.ExecRequest) -> None:
        state = _RUNTIME_STATE / container_id / "config.json"
        try:
            config = json.loads(state.read_text())
        except (OSError, ValueError) as exc:
            raise ExecUnavailable(f"the container is not running ({exc.__class__.__name__})") from exc
        spec = process_spec(config, request)
        _SCRATCH.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(dir=_SCRATCH))
        self._log = self.dir / "crun.log"
        self._pid_file = self.dir / "pid"
        self._console: socket.socket | None = None
        try:
            (self.dir / "process.json").write_text(json.dumps(spec))
            options = ["--pid-file", str(self._pid_file), "--process", str(self.dir / "process.json")]
            if request.tty:
                self._console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._console.bind(str(self.dir / "console"))
                self._console.listen(1)
                self._console.settimeout(_CONSOLE_POLL)
                options += ["--console-socket", str(self.dir / "console")]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.argv = ["crun", f"--log=file:{self._log}", "exec", *options, container_id]

    def __enter__(self) -> Execution:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._console is not None:
            self._console.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def receive_console(self, crun: subprocess.Popen[bytes]) -> int | None:
        """The terminal's master end, which crun passes over the console socket; None if crun failed first."""
        assert self._console is not None
        while True:
            try:
                conn, _ = self._console.accept()
                break
            except TimeoutError:
                if crun.poll() is not None:
                    return None
        with conn:
            conn.settimeout(None)
            _, fds, _, _ = socket.recv_fds(conn, 64, 1)
        return fds[0] if fds else None

    def kill(self, crun: subprocess.Popen[bytes]) -> None:
        """Kill the command, not only crun (which would leave it running in the container)."""
        with contextlib.suppress(OSError, ValueError):
            # crun is the command's parent and exits right after reaping it: while crun lives, the pid is the command's.
            if crun.poll() is None:
                os.kill(int(self._pid_file.read_text()), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            crun.kill()

    def exit_code(self, returncode: int) -> int:
        try:
            crun_log = self._log.read_text(errors="replace")
        except FileNotFoundError:
            crun_log = ""
        return exit_code(returncode, crun_log)
