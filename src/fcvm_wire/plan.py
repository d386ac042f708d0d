"""The plan: everything the guest needs to know, built on the host, validated on both sides."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field

from fcvm_wire.checks import describe, is_int, is_text, loads, object_fields

PLAN_VERSION = 1
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
# Bounds on what a plan may hold. The plan travels in one control line (control.MAX_LINE) or MMDS anyway;
# these keep any one field sane.
_MAX_PATH = 4096  # PATH_MAX: paths, and every other short string (name, image ref, user)
_MAX_ARG = 128 * 1024  # MAX_ARG_STRLEN: one argv word or environment value
_MAX_ITEMS = 1024  # argv words, environment entries, volumes
_MAX_DNS = 16
_MAX_ADDRESS = 64
_MAX_U63 = 2**63 - 1


class PlanError(Exception):
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
        return cls.from_dict(loads(text, PlanError, "plan"))

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        """The plan in a decoded JSON document, or PlanError. Only the document's shape is checked here (objects
        with exactly the known fields); validate() checks every value, so one set of rules serves plans that
        arrive as JSON and plans the host builds."""
        if not isinstance(data, dict):
            raise PlanError(f"plan must be a JSON object, not {describe(data)}")
        version = data.get("version")
        if not is_int(version, PLAN_VERSION, PLAN_VERSION):
            raise PlanError(f"plan version {describe(version)} is not supported (this agent speaks {PLAN_VERSION})")
        top = object_fields(data, cls, PlanError, "plan")
        volumes = top.get("volumes", [])
        plan = cls(**{
            **top,
            "image": ImageSpec(**object_fields(top["image"], ImageSpec, PlanError, "plan.image")),
            "network": NetworkSpec(**object_fields(top["network"], NetworkSpec, PlanError, "plan.network")),
            # Anything but a list is left for validate() to name.
            "volumes": [VolumeSpec(**object_fields(v, VolumeSpec, PlanError, f"plan.volumes[{i}]"))
                        for i, v in enumerate(volumes)] if isinstance(volumes, list) else volumes,
        })
        plan.validate()
        return plan

    def validate(self) -> None:
        """Raise PlanError naming the first field whose value has the wrong type or is out of range. Total: it
        never raises anything else, whatever the attributes hold."""
        _check(is_int(self.version, PLAN_VERSION, PLAN_VERSION), f"version must be {PLAN_VERSION}")
        _check(is_text(self.name, _MAX_PATH) and self.name != "", "name must be a non-empty string")
        _check(is_text(self.hostname, _MAX_PATH), "hostname must be a string")
        _check(is_text(self.user, _MAX_PATH), "user must be a string")
        _check(is_text(self.workdir, _MAX_PATH), "workdir must be a string")
        _check(is_int(self.epoch, 0, _MAX_U63), "epoch must be a non-negative integer")
        _check(isinstance(self.cmd, list) and len(self.cmd) <= _MAX_ITEMS
               and all(is_text(word, _MAX_ARG) for word in self.cmd),
               f"cmd must be a list of at most {_MAX_ITEMS} strings")
        _validate_env(self.env)
        _validate_image(self.image)
        _validate_network(self.network)
        _check(isinstance(self.volumes, list) and len(self.volumes) <= _MAX_ITEMS,
               f"volumes must be a list of at most {_MAX_ITEMS} entries")
        for volume in self.volumes:
            _validate_volume(volume)


def _validate_env(env: object) -> None:
    if not isinstance(env, dict) or len(env) > _MAX_ITEMS:
        raise PlanError(f"env must be an object of at most {_MAX_ITEMS} entries")
    for key, value in env.items():
        _check(isinstance(key, str) and _ENV_KEY.fullmatch(key) is not None,
               f"env key {describe(key)} is not a valid variable name")
        _check(is_text(value, _MAX_ARG), f"env {key} must be a string")


def _validate_image(image: object) -> None:
    if not isinstance(image, ImageSpec):
        raise PlanError("image must be an object")
    _check(is_text(image.ref, _MAX_PATH) and image.ref != "", "image.ref must be set")
    _check(is_text(image.disk, _MAX_PATH) and (image.disk == "" or image.disk.startswith("/")),
           "image.disk must be an absolute path or empty")
    _check(is_int(image.archive_size, 0, _MAX_U63), "image.archive_size must be a non-negative integer")


def _validate_network(network: object) -> None:
    if not isinstance(network, NetworkSpec):
        raise PlanError("network must be an object")
    _check(_is_ip(network.address, version=4), "network.address must be an IPv4 address")
    _check(_is_ip(network.gateway, version=4), "network.gateway must be an IPv4 address")
    _check(is_int(network.prefix, 1, 32), "network.prefix must be 1..32")
    _check(isinstance(network.mac, str) and _MAC.fullmatch(network.mac) is not None,
           "network.mac must be a MAC address")
    _check(isinstance(network.dns, list) and len(network.dns) <= _MAX_DNS and all(_is_ip(a) for a in network.dns),
           f"network.dns must be a list of at most {_MAX_DNS} IP addresses")


def _validate_volume(volume: object) -> None:
    if not isinstance(volume, VolumeSpec):
        raise PlanError("each volume must be an object")
    _check(is_text(volume.guest_path, _MAX_PATH) and volume.guest_path.startswith("/"),
           f"volume path {describe(volume.guest_path)} must be absolute")
    _check(is_int(volume.port, 1, 2**32 - 1), f"volume port {describe(volume.port)} out of range")
    _check(isinstance(volume.read_only, bool), "volume read_only must be true or false")


def _is_ip(value: object, *, version: int | None = None) -> bool:
    """An IP address in text (of `version` 4 or 6, or either)."""
    if not is_text(value, _MAX_ADDRESS):
        return False
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return version is None or address.version == version


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)
