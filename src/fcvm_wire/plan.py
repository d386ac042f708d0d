"""The plan: everything the guest needs to know, built on the host, validated on both sides."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_VERSION = 1
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PlanError(ValueError):
    """The plan is malformed; the message names the field."""


@dataclass
class ImageSpec:
    ref: str
    # Read-only disk holding an image archive (docker-archive tar, padded to 512 bytes), or "" to pull.
    disk: str = ""
    archive_size: int = 0


@dataclass
class NetworkSpec:
    address: str
    prefix: int
    gateway: str
    mac: str
    dns: list[str] = field(default_factory=list)


@dataclass
class VolumeSpec:
    guest_path: str
    port: int
    read_only: bool = False


@dataclass
class Plan:
    name: str
    image: ImageSpec
    network: NetworkSpec
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = ""
    volumes: list[VolumeSpec] = field(default_factory=list)
    hostname: str = ""
    # Bumped on every snapshot restore so the agent knows to regenerate identity and reconnect.
    epoch: int = 0
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan is not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError("plan must be a JSON object")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version!r} is not supported (this agent speaks {PLAN_VERSION})")
        try:
            plan = cls(
                name=data["name"],
                image=ImageSpec(**data["image"]),
                network=NetworkSpec(**data["network"]),
                cmd=list(data.get("cmd", [])),
                env=dict(data.get("env", {})),
                user=data.get("user", ""),
                workdir=data.get("workdir", ""),
                volumes=[VolumeSpec(**v) for v in data.get("volumes", [])],
                hostname=data.get("hostname", ""),
                epoch=data.get("epoch", 0),
            )
        except KeyError as exc:
            raise PlanError(f"plan is missing {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"plan has a bad field: {exc}") from None
        plan.validate()
        return plan

    def validate(self) -> None:
        _check(isinstance(self.name, str) and self.name != "", "name must be a non-empty string")
        _check(isinstance(self.image.ref, str) and self.image.ref != "", "image.ref must be set")
        _check(isinstance(self.image.archive_size, int) and self.image.archive_size >= 0,
               "image.archive_size must be a non-negative integer")
        _check(all(isinstance(a, str) for a in self.cmd), "cmd must be a list of strings")
        for key, value in self.env.items():
            _check(bool(_ENV_KEY.match(key)), f"env key {key!r} is not a valid variable name")
            _check(isinstance(value, str), f"env {key} must be a string")
        _check(isinstance(self.network.prefix, int) and 0 < self.network.prefix <= 32,
               "network.prefix must be 1..32")
        for volume in self.volumes:
            _check(volume.guest_path.startswith("/"), f"volume path {volume.guest_path!r} must be absolute")
            _check(isinstance(volume.port, int) and 0 < volume.port < 2**32, "volume port out of range")
        _check(isinstance(self.epoch, int) and self.epoch >= 0, "epoch must be a non-negative integer")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)
