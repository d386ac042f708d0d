from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fcvm.commands.doctor import Check, _hypervisor, _vmm_verdict
from fcvm.core import host

EXPECTED = {"kvm", "firecracker", "jailer", "qemu", "vmm privileges", "podman", "host runtime", "storage",
            "userfaultfd", "fuse", "tun", "iptables", "slirp4netns", "guest kernel", "guest rootfs", "hypervisor"}


def test_doctor_json_covers_every_check_and_gives_a_fix_for_each_problem() -> None:
    result = subprocess.run([sys.executable, "-m", "fcvm", "doctor", "--json"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "FCVM_FIRECRACKER_BIN": ""})
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == EXPECTED
    assert all(c["fix"] for c in checks.values() if c["status"] != "ok"), checks
    essential_ok = all(c["status"] == "ok" for c in checks.values() if c["essential"])
    assert report["ready"] == essential_ok
    assert result.returncode == (0 if essential_ok else 1)
    # KVM is judged by whether it can boot a standard guest, not by whether /dev/kvm exists.
    assert checks["kvm"]["detail"] == host.kvm_status().detail


@pytest.mark.parametrize(
    ("kvm", "firecracker", "qemu", "expected"),
    [
        ("ok", "firecracker 1.16.1 at /usr/bin/firecracker", "ok", "firecracker 1.16.1 at /usr/bin/firecracker"),
        ("warn", "firecracker 1.16.1 at /usr/bin/firecracker", "ok", "qemu (tcg)"),
        ("warn", "firecracker (fc-mock) 1.16.1 at /x", "missing", "firecracker (fc-mock) 1.16.1 at /x"),
        ("warn", "", "missing", "none can boot a guest"),
    ],
)
def test_the_hypervisor_verdict_needs_something_that_really_boots(
    kvm: str, firecracker: str, qemu: str, expected: str
) -> None:
    found = {
        "kvm": Check("kvm", kvm, ""),
        "firecracker": Check("firecracker", "ok" if firecracker else "missing", firecracker),
        "qemu": Check("qemu", qemu, ""),
    }
    assert _hypervisor(found).detail == expected


@pytest.mark.parametrize(
    ("root", "setpriv", "tun_mode", "firecracker", "status", "says"),
    [
        (True, True, 0o20666, True, "warn", "Firecracker without --jailer runs as root"),
        (True, True, 0o20666, False, "ok", "a uid of its own"),
        (True, False, 0o20666, False, "missing", "no setpriv"),
        (True, True, 0o20600, False, "missing", "/dev/net/tun"),
        (False, False, None, True, "ok", "this user"),
    ],
)
def test_doctor_says_when_a_vmm_would_run_as_root(root: bool, setpriv: bool, tun_mode: int | None,
                                                  firecracker: bool, status: str, says: str) -> None:
    check = _vmm_verdict(root=root, setpriv=setpriv, tun_mode=tun_mode, firecracker=firecracker)
    assert (check.status, says in check.detail) == (status, True), check
    assert bool(check.fix) == (status != "ok")
