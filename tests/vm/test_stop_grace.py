"""`fcvm stop -t N`, like `podman stop -t N`: the container gets SIGTERM, then SIGKILL after N seconds."""

from __future__ import annotations

from tests.vm.support import RunVm, fcvm, vm_row

# PID 1 of the container takes 4 s to finish its SIGTERM handler, then exits 3: it gets there only if the stop
# timeout is longer than that.
_SLOW_TO_STOP = ["sh", "-c", "trap 'sleep 4; exit 3' TERM; echo up; while true; do sleep 1; done"]


def test_the_stop_timeout_decides_between_the_containers_own_exit_and_sigkill(run_vm: RunVm) -> None:
    run_vm("-d", "--no-snapshot", "--name", "patient", "localhost/fcvm-busybox", *_SLOW_TO_STOP)
    run_vm("-d", "--no-snapshot", "--name", "hurried", "localhost/fcvm-busybox", *_SLOW_TO_STOP)
    fcvm("stop", "-t", "30", "patient")
    fcvm("stop", "-t", "1", "hurried")
    assert vm_row("patient")["exit_code"] == 3  # its handler ran to the end
    assert vm_row("hurried")["exit_code"] == 137  # killed one second into its handler
