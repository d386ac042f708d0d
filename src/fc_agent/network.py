"""Guest networking from the plan (iproute2 is in the rootfs)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from fc_agent import system
from fcvm_wire.plan import NetworkSpec

INTERFACE = "eth0"


def _ip(*args: str) -> None:
    result = system.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.decode().strip()}")


def wait_for_interface(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(f"/sys/class/net/{INTERFACE}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {INTERFACE} after {timeout} s: is virtio_net loaded?")
        time.sleep(0.05)


def link_up() -> None:
    _ip("link", "set", "lo", "up")
    wait_for_interface()
    _ip("link", "set", INTERFACE, "up")


def route_mmds(address: str) -> None:
    _ip("route", "replace", address, "dev", INTERFACE)


def configure_early(word: str) -> None:
    """`fcvm_net=ADDRESS/PREFIX,GATEWAY` from the kernel command line."""
    cidr, _, gateway = word.partition(",")
    _ip("addr", "replace", cidr, "dev", INTERFACE)
    if gateway:
        _ip("route", "replace", "default", "via", gateway, "dev", INTERFACE)


def configure(spec: NetworkSpec) -> None:
    _ip("addr", "replace", f"{spec.address}/{spec.prefix}", "dev", INTERFACE)
    _ip("route", "replace", "default", "via", spec.gateway, "dev", INTERFACE)
    Path("/etc/resolv.conf").write_text("".join(f"nameserver {dns}\n" for dns in spec.dns))


def set_hostname(name: str) -> None:
    Path("/etc/hostname").write_text(name + "\n")
    Path("/proc/sys/kernel/hostname").write_text(name)
    hosts = Path("/etc/hosts")
    lines = [line for line in hosts.read_text().splitlines() if not line.endswith(" # fcvm")] if hosts.exists() else []
    hosts.write_text("\n".join([*lines, f"127.0.1.1 {name} # fcvm"]) + "\n")

