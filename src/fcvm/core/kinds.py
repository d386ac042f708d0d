"""The fixed sets of values that cross layers. Cheap to import: the CLI builds its `choices=` from them."""

from __future__ import annotations

from enum import StrEnum


class NetworkMode(StrEnum):
    BRIDGED = "bridged"  # root: netns, veth, TAP, iptables
    ROOTLESS = "rootless"  # user + net namespace, slirp4netns


class VmmKind(StrEnum):
    """Which VMM runs a VM. `--hypervisor auto` resolves to one of these (see fcvm.vmm.select)."""

    QEMU = "qemu"
    FIRECRACKER = "firecracker"


HYPERVISOR_CHOICES = ("auto", *VmmKind)


class VmStatus(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


class RowKind(StrEnum):
    """What a row of the `vms` table is: a VM, a UFFD memory server, or a clone of a snapshot."""

    VM = "vm"
    SERVE = "serve"
    CLONE = "clone"


class Health(StrEnum):
    UNKNOWN = "unknown"
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class CheckStatus(StrEnum):
    """The outcome of one `fcvm doctor` check."""

    OK = "ok"
    WARN = "warn"
    MISSING = "missing"
