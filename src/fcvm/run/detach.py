"""`fcvm podman run -d`: the supervisor runs in a child of its own session; we return once the VM is running.

The child gets the parsed request as JSON on its stdin, never as argv: the container's command reaches it
exactly as the user typed it (`-d` or `--name` inside it are the container's own), and `-e` values never
appear in any /proc/PID/cmdline. Its output goes to `supervisor.log` in the VM's log directory, which
`fcvm rm` removes with the rest. It says the VM is ready by writing to a pipe we wait on (the end of the pipe,
without a word, means it gave up), so `-d` returns at once, not at the next look at the state store.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from fcvm.core import paths
from fcvm.core.errors import FcvmError
from fcvm.core.proc import spawn
from fcvm.core.wait import wait_until
from fcvm.run.request import SUPERVISOR_LOG, RunRequest
from fcvm.state import Store
from fcvm.state.store import new_id

READY = b"R"


def detach(request: RunRequest, *, quiet: bool = False) -> str:
    """Start the supervisor in the background; once the VM runs (and is not still starting), print its id
    (unless `quiet`) and return it."""
    vm_id = new_id()
    log_path = paths.ensure_dir(paths.vm_logs_dir(vm_id), 0o700) / SUPERVISOR_LOG
    store = Store()
    timeout = request.boot_timeout + 60  # the child gives up first, with the real reason
    ready_r, ready_w = os.pipe()
    try:
        with open(paths.make_private(log_path), "ab") as log_file, spawn(
            [sys.executable, "-m", "fcvm.run.detach", vm_id, str(ready_w)], stdin=subprocess.PIPE,
            stdout=log_file, stderr=subprocess.STDOUT, pass_fds=[ready_w],
        ) as child:
            os.close(ready_w)
            ready_w = -1
            assert child.popen.stdin is not None
            child.popen.stdin.write(request.to_json().encode())
            child.popen.stdin.close()
            readable, _, _ = select.select([ready_r], [], [], timeout)
            if not readable:
                raise FcvmError(f"VM {request.name} did not become ready within {timeout:.0f} s",
                                hint=f"see {log_path}")
            if os.read(ready_r, 1) == READY:
                child.release()
                _relay_warnings(log_path)
                if not quiet:
                    print(vm_id)
                return vm_id
            wait_until(child.exited, 30)  # the pipe ended with the child (not reaped: `reap` kills its group)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            if store.get_vm(vm_id) is None:  # it never booted: nothing is left for `fcvm rm` to remove
                shutil.rmtree(log_path.parent, ignore_errors=True)
            raise FcvmError(f"VM {request.name} failed to start: "
                            f"{' / '.join(tail) or f'exit code {child.reap()}'}")
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)


def _relay_warnings(log_path: Path) -> None:
    """What the background run warned about so far (a cache entry that failed to restore, say) is the user's to
    see, as a foreground run would have shown it."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.lstrip().startswith(("warning ", "error ")):
            print(line.strip(), file=sys.stderr)


def main() -> None:
    """The detached child: `python3 -m fcvm.run.detach VM_ID READY_FD`, the request as JSON on stdin. READY is
    written to READY_FD once the VM runs and is no longer starting."""
    from fcvm.core import log
    from fcvm.run.warm import run_with_fallback

    log.setup(None)
    ready_fd = int(sys.argv[2])
    os.set_inheritable(ready_fd, False)  # the pipe must end with us, not with the VMM we start
    request = RunRequest.from_json(sys.stdin.read())
    sys.stdin.close()

    def ready() -> None:
        with contextlib.suppress(OSError):  # the parent may be gone (Ctrl-C): nobody is waiting then
            os.write(ready_fd, READY)
        os.close(ready_fd)

    try:
        code = run_with_fallback(replace(request, echo_output=False), vm_id=sys.argv[1], on_ready=ready)
    except FcvmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
