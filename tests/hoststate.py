"""A snapshot of everything fcvm may create on the host, to assert that teardown restores it."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_PODMAN_STORAGE = ("/var/lib/containers/storage/", "/run/containers/storage/")


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return result.stdout


def _iptables() -> list[str]:
    rules = []
    for line in _run("iptables-save").splitlines():
        if line.startswith("#"):
            continue
        rules.append(re.sub(r"\[\d+:\d+\]", "", line))  # packet counters change, rules must not
    return rules


def _processes() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(tool in cmdline for tool in ("qemu-system", "slirp4netns", "pasta", "fcvm-fc-mock")):
            found.append(cmdline.strip())
    return sorted(found)


@dataclass(frozen=True)
class HostState:
    netns: tuple[str, ...]
    links: tuple[str, ...]
    iptables: tuple[str, ...]
    mounts: tuple[str, ...]
    processes: tuple[str, ...]

    @classmethod
    def capture(cls) -> HostState:
        netns = tuple(sorted(line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line))
        links = tuple(sorted(p.name for p in Path("/sys/class/net").iterdir()))
        mounts = tuple(sorted(
            point for line in Path("/proc/self/mountinfo").read_text().splitlines()
            # podman (used on the host to export images) mounts and unmounts its own storage as it pleases
            if not (point := line.split()[4]).startswith(_PODMAN_STORAGE)
        ))
        return cls(netns, links, tuple(_iptables()), mounts, tuple(_processes()))

    def diff(self, other: HostState) -> dict[str, tuple[list[str], list[str]]]:
        """{field: (only in self, only in other)} for the fields that differ."""
        result = {}
        for name in self.__dataclass_fields__:
            mine, theirs = set(getattr(self, name)), set(getattr(other, name))
            if mine != theirs:
                result[name] = (sorted(mine - theirs), sorted(theirs - mine))
        return result
