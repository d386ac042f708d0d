"""VM networking: bridged (netns, veth, tap, iptables) and rootless (user namespace + slirp4netns).

Every resource is journaled before it is created, so `teardown_network(journal)`, `fcvm.cleanup.replay` and
`fcvm gc` (after a SIGKILL) all remove it; see undo.py for the handlers.
"""

from __future__ import annotations

import os

from fcvm.core import log
from fcvm.core.errors import UsageError
from fcvm.core.kinds import NetworkMode
from fcvm.network.base import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    GUEST_NET,
    GUEST_PREFIX,
    TAP_NAME,
    VmNetwork,
    release_network_allocations,
)
from fcvm.network.ports import PortMapping, parse_publish, parse_publish_all
from fcvm.state.journal import Journal
from fcvm.state.store import Store

__all__ = [
    "GATEWAY_IP", "GUEST_IP", "GUEST_MAC", "GUEST_NET", "GUEST_PREFIX", "TAP_NAME",
    "PortMapping", "VmNetwork", "default_mode", "parse_publish", "parse_publish_all", "setup_network",
    "teardown_network",
]

_log = log.get("network")


def default_mode() -> NetworkMode:
    return NetworkMode.BRIDGED if os.geteuid() == 0 else NetworkMode.ROOTLESS


def setup_network(mode: NetworkMode, *, store: Store, journal: Journal, vm_id: str, ports: list[PortMapping],
                  tap_uid: int | None = None, host_loopback: bool = False) -> VmNetwork:
    """Build the VM's network. On any failure everything this call built (and claimed) is gone again.

    The VM reaches the world, DNS and published ports, but neither the host nor another VM; `host_loopback`
    lets it reach the host's 127.0.0.1 at its gateway address (--allow-host-loopback). `tap_uid` owns the
    TAP, so a VMM running as that uid (a jailed Firecracker) may attach to it."""
    if mode not in list(NetworkMode):  # a typo must not quietly get the other mode
        raise UsageError(f"unknown network mode {mode!r}", hint="use --network bridged or --network rootless")
    from fcvm.network import bridged, rootless

    if tap_uid is not None and mode != NetworkMode.BRIDGED:
        raise UsageError("a TAP owned by another uid needs --network bridged")
    try:
        if mode == NetworkMode.BRIDGED:
            return bridged.setup(store=store, journal=journal, vm_id=vm_id, ports=list(ports), tap_uid=tap_uid,
                                 host_loopback=host_loopback)
        return rootless.setup(store=store, journal=journal, vm_id=vm_id, ports=list(ports),
                              host_loopback=host_loopback)
    except BaseException:
        failures = teardown_network(journal)
        for failure in failures:
            _log.warning("after a failed network setup: %s", failure)
        raise


def teardown_network(journal: Journal) -> list[str]:
    """Undo the network resources in `journal` (newest first) and release the owner's network allocations
    (ports, subnet, loopback address). Other layers' entries are left alone. Returns what could not be undone
    (those entries stay journaled, for `fcvm gc`).

    `fcvm.cleanup.replay(store, vm_id)` undoes the same resources (and everything else); allocations are then
    released by `finish_vm` / `Store.release_allocations`.
    """
    from fcvm.core import undo as core_undo
    from fcvm.network.undo import HANDLERS

    handlers = {**core_undo.HANDLERS, **HANDLERS}
    failures: list[str] = []
    for entry in journal.entries():
        if entry.kind not in HANDLERS and entry.data.get("layer") != "network":
            continue
        try:
            handlers[entry.kind](entry.data)
        except Exception as exc:
            failures.append(f"{entry.kind} {entry.data}: {exc}")
            continue
        journal.forget(entry.id)
    release_network_allocations(journal.store, journal.owner)
    return failures
