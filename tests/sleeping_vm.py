"""A backend for fcvm-fc-mock that runs `sleep` where fc-mock would boot QEMU. fc-mock loads it from its file
(FCVM_FC_MOCK_BACKEND=SLEEPING_VM), outside the test's sys.path: it imports nothing from tests."""

from __future__ import annotations

import subprocess

from fcvm.core import log
from fcvm.core.proc import ProcessRef
from fcvm.vmm.base import MachineSpec


class SleepingVm:
    """fc-mock's backend in place of QEMU (FCVM_FC_MOCK_BACKEND=SLEEPING_VM): a `sleep` for the VMM process,
    and the kernel command line in the console log, where a guest kernel would print it."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self._sleep: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> ProcessRef:
        assert self._sleep is not None
        return ProcessRef.of(self._sleep.pid)

    def start(self) -> None:
        self._sleep = subprocess.Popen(["sleep", "60"])
        log.get("vm." + self.spec.name).info("guest: " + self.spec.boot_args)

    def wait(self, timeout: float | None = None) -> int | None:
        assert self._sleep is not None
        return self._sleep.wait(timeout)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        assert self._sleep is not None
        self._sleep.terminate()
        self._sleep.wait()


SLEEPING_VM = f"{__file__}:{SleepingVm.__name__}"
