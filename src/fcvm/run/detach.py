"""`fcvm podman run -d`: the supervisor runs in a child of its own session; we return once the VM is running.

The child gets the parsed request as JSON on its stdin, never as argv: the container's command reaches it
exactly as the user typed it (`-d` or `--name` inside it are the container's own), and `-e` values never
appear in any /proc/PID/cmdline. Its output goes to `supervisor.log` in the VM's log directory, which
`fcvm rm` removes with the rest.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fcvm.core import paths
from fcvm.core.errors import FcvmError
from fcvm.core.kinds import Health, VmStatus
from fcvm.core.proc import spawn
from fcvm.run.request import SUPERVISOR_LOG, RunRequest
from fcvm.state import Store
from fcvm.state.store import new_id


def detach(request: RunRequest, *, quiet: bool = False) -> str:
    """Start the supervisor in the background; once the VM runs (and is not still starting), print its id
    (unless `quiet`) and return it."""
    vm_id = new_id()
    log_path = paths.ensure_dir(paths.vm_logs_dir(vm_id), 0o700) / SUPERVISOR_LOG
    store = Store()
    deadline = time.monotonic() + request.boot_timeout + 60  # the child gives up first, with the real reason
    with open(paths.make_private(log_path), "ab") as log_file, spawn(
        [sys.executable, "-m", "fcvm.run.detach", vm_id], stdin=subprocess.PIPE, stdout=log_file,
        stderr=subprocess.STDOUT,
    ) as child:
        assert child.popen.stdin is not None
        child.popen.stdin.write(request.to_json().encode())
        child.popen.stdin.close()
        while time.monotonic() < deadline:
            vm = store.get_vm(vm_id)
            if vm is not None and vm.status == VmStatus.RUNNING and vm.health != Health.STARTING:
                child.release()
                _relay_warnings(log_path)
                if not quiet:
                    print(vm.id)
                return vm.id
            if child.exited():
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                if store.get_vm(vm_id) is None:  # it never booted: nothing is left for `fcvm rm` to remove
                    shutil.rmtree(log_path.parent, ignore_errors=True)
                raise FcvmError(f"VM {request.name} failed to start: "
                                f"{' / '.join(tail) or f'exit code {child.reap()}'}")
            time.sleep(0.1)
        raise FcvmError(f"VM {request.name} did not become ready within {request.boot_timeout + 60:.0f} s",
                        hint=f"see {log_path}")


def _relay_warnings(log_path: Path) -> None:
    """What the background run warned about so far (a cache entry that failed to restore, say) is the user's to
    see, as a foreground run would have shown it."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.lstrip().startswith(("warning ", "error ")):
            print(line.strip(), file=sys.stderr)


def main() -> None:
    """The detached child: `python3 -m fcvm.run.detach VM_ID`, the request as JSON on stdin."""
    from fcvm.core import log
    from fcvm.run.warm import run_with_fallback

    log.setup(None)
    request = RunRequest.from_json(sys.stdin.read())
    sys.stdin.close()
    try:
        code = run_with_fallback(replace(request, echo_output=False), vm_id=sys.argv[1])
    except FcvmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
