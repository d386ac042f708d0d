"""`fcvm ls`: list VMs. Reaps rows whose process died first, so what it shows is true."""

from __future__ import annotations

import json

from fcvm.core import table
from fcvm.run.cleanup import reap_stale
from fcvm.state import Store, VmRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from types import SimpleNamespace


def format_ports(vm: VmRecord) -> str:
    """Where each port is reachable: the VM's own loopback address in rootless mode, all addresses otherwise."""
    bound = {int(port): ip for ip, port, _ in vm.network.get("published", [])}
    return ", ".join(
        f"{p.get('host_ip') or (bound.get(p['host_port']) if vm.network.get('loopback') else '') or '0.0.0.0'}"
        f":{p['host_port']}->{p['guest_port']}/{p.get('protocol', 'tcp')}"
        for p in vm.ports
    )


def format_network(vm: VmRecord) -> str:
    mode = vm.network.get("mode", "")
    where = vm.network.get("loopback") or ""
    return f"{mode} {where}".strip()


def format_status(vm: VmRecord) -> str:
    if vm.status != "exited":
        return vm.status
    return f"exited ({vm.exit_code})" if vm.exit_code is not None else "exited (killed)"


def run(args: argparse.Namespace | SimpleNamespace) -> int:
    store = Store()
    reap_stale(store)
    vms = store.list_vms(include_exited=args.all)
    if args.json:
        print(json.dumps([vm.to_json() for vm in vms], indent=2))
        return 0
    headers = ("ID", "NAME", "PID", "STATUS", "HEALTH", "NETWORK", "PORTS", "IMAGE", "HYPERVISOR")
    rows = [
        (vm.id, vm.name, str(vm.pid or ""), format_status(vm), vm.health, format_network(vm),
         format_ports(vm), vm.image, vm.hypervisor)
        for vm in vms
    ]
    print(table.render(headers, rows))
    return 0
