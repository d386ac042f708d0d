"""The container's seccomp profile (fc_agent.seccomp): podman's default, except that no AF_VSOCK socket can be
created, by any of the ways a process could ask for one; every other socket works as before. Applied as podman
and crun apply it (tests/crun_seccomp.py); tests/vm/test_agent_channel_security.py runs it in a real guest."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fc_agent import seccomp
from tests import crun_seccomp
from tests.support import require
from tests.vsock_probes import write_probes

PODMAN_PROFILE = Path("/usr/share/containers/seccomp.json")


@pytest.fixture
def profiles(tmp_path: Path) -> dict[str, Path]:
    require(PODMAN_PROFILE.is_file(), f"needs podman's default seccomp profile at {PODMAN_PROFILE}")
    require(crun_seccomp.library_path() is not None, "needs libseccomp")
    derived = seccomp.write_profile(PODMAN_PROFILE, tmp_path / "profile" / "seccomp.json")
    return {"podman": PODMAN_PROFILE, "fcvm": derived}


def run_under(profile: Path, program: Path) -> int:
    loader = Path(crun_seccomp.__file__)
    return subprocess.run([sys.executable, str(loader), str(profile), str(program)], timeout=30).returncode


def test_no_vsock_socket_by_any_route_while_other_sockets_work(profiles: dict[str, Path], tmp_path: Path) -> None:
    probes = write_probes(tmp_path)
    under_podman = {name: run_under(profiles["podman"], probe) for name, probe in probes.items()}
    assert under_podman["vsock"] == 0, "podman's own profile allows AF_VSOCK (what this profile is for)"

    under_fcvm = {name: run_under(profiles["fcvm"], probe) for name, probe in probes.items()}
    assert under_fcvm == {
        "vsock": errno.EPERM,
        "vsock-high-bits": errno.ENOSYS,  # not an allowed family once all 64 bits are compared: the default action
        "vsock-i386": -signal.SIGSYS,  # 32-bit system calls kill the process
        "vsock-socketcall": -signal.SIGSYS,
        "unix": 0,
    }


def test_only_the_socket_rules_and_32_bit_x86_change() -> None:
    require(PODMAN_PROFILE.is_file(), f"needs podman's default seccomp profile at {PODMAN_PROFILE}")
    default = json.loads(PODMAN_PROFILE.read_text())
    derived = seccomp.derive(default)

    def without_socket(profile: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**rule, "names": [n for n in rule["names"] if n != "socket"]} for rule in profile["syscalls"]
                if rule["names"] != ["socket"]]

    assert without_socket(derived) == without_socket(default)
    x86_64 = next(a for a in derived["archMap"] if a["architecture"] == "SCMP_ARCH_X86_64")
    assert x86_64["subArchitectures"] == ["SCMP_ARCH_X32"]
    assert [a for a in derived["archMap"] if a["architecture"] != "SCMP_ARCH_X86_64"] == \
        [a for a in default["archMap"] if a["architecture"] != "SCMP_ARCH_X86_64"]
