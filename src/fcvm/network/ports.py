"""`-p [HOSTIP:]HOSTPORT:GUESTPORT[/udp]` published ports."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from fcvm.core.errors import UsageError

PROTOCOLS = ("tcp", "udp")
_FORMAT = "[HOSTIP:]HOSTPORT:GUESTPORT[/udp]"


@dataclass(frozen=True)
class PortMapping:
    """One published port. `host_ip` "" means the mode's default: every local address (bridged) or the
    VM's own loopback address (rootless)."""

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        spec = f"{self.host_port}:{self.guest_port}"
        if self.host_ip:
            spec = f"{self.host_ip}:{spec}"
        return spec if self.protocol == "tcp" else f"{spec}/{self.protocol}"

    def to_json(self) -> dict[str, Any]:
        return {"host_ip": self.host_ip, "host_port": self.host_port, "guest_port": self.guest_port,
                "protocol": self.protocol}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortMapping:
        return cls(str(data["host_ip"]), int(data["host_port"]), int(data["guest_port"]), str(data["protocol"]))


def _bad(spec: str, why: str) -> UsageError:
    return UsageError(f"invalid -p {spec!r}: {why}", hint=f"use {_FORMAT}, e.g. -p 8080:80 or -p 127.0.0.1:53:53/udp")


def _port(spec: str, text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _bad(spec, f"{what} {text!r} is not a number" if text else f"{what} is missing")
    value = int(text)
    if not 1 <= value <= 65535:
        raise _bad(spec, f"{what} {value} is out of range 1-65535")
    return value


def parse_publish(spec: str) -> PortMapping:
    """Parse one `-p` value. Raises UsageError naming what is wrong."""
    text = spec.strip()
    if not text:
        raise _bad(spec, "it is empty")
    protocol = "tcp"
    if "/" in text:
        text, protocol = text.rsplit("/", 1)
        protocol = protocol.lower()
        if protocol not in PROTOCOLS:
            raise _bad(spec, f"protocol {protocol!r} is not supported (tcp or udp)")
    if text.startswith("["):
        raise _bad(spec, "IPv6 host addresses are not supported")
    parts = text.split(":")
    host_ip = ""
    if len(parts) == 3:
        host_ip = parts.pop(0)
        if not host_ip:
            raise _bad(spec, "the host address before the first ':' is empty")
        try:
            host_ip = str(ipaddress.IPv4Address(host_ip))
        except ValueError:
            raise _bad(spec, f"host address {host_ip!r} is not an IPv4 address") from None
    elif len(parts) == 1:
        raise _bad(spec, "a host port is required (random host ports are not supported)")
    elif len(parts) != 2:
        raise _bad(spec, "too many ':'")
    if "-" in parts[0] or "-" in parts[1]:
        raise _bad(spec, "port ranges are not supported")
    host_port = _port(spec, parts[0], "host port")
    guest_port = _port(spec, parts[1], "guest port")
    return PortMapping(host_ip, host_port, guest_port, protocol)


def parse_publish_all(specs: list[str]) -> list[PortMapping]:
    """Parse repeated `-p`; the same host address, port and protocol may appear only once."""
    mappings = [parse_publish(s) for s in specs]
    seen: dict[tuple[str, int], PortMapping] = {}
    for m in mappings:
        key = (m.protocol, m.host_port)
        other = seen.get(key)
        if other is not None and (not other.host_ip or not m.host_ip or other.host_ip == m.host_ip):
            raise UsageError(f"-p {m} and -p {other} publish the same host port {m.host_port}/{m.protocol}",
                             hint="give each -p its own host port")
        seen[key] = m
    return mappings
