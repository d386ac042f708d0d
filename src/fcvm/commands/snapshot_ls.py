"""`fcvm snapshot ls [--json]`: snapshots, their memory servers, and each server's per-client metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fcvm.core.kinds import RowKind
from fcvm.state.store import Store, VmRecord


def _server_json(vm: VmRecord) -> dict[str, Any]:
    config = vm.config or {}
    metrics = config.get("metrics") or {}
    server = metrics.get("server") or {}
    return {
        "id": vm.id,
        "name": vm.name,
        "pid": vm.pid,
        "status": "stale" if vm.is_stale() else vm.status,
        "snapshot": config.get("snapshot"),
        "socket": config.get("socket"),
        "mem_file": config.get("mem_file"),
        "prefetch": config.get("prefetch"),
        "fault_around": config.get("fault_around"),
        "working_set_bytes": server.get("working_set_bytes", 0),
        "clients_total": server.get("clients_total", 0),
        "clients_live": server.get("clients_live", 0),
        "rejected": server.get("rejected", 0),
        "clients": metrics.get("clients", []),
    }


def collect(store: Store) -> dict[str, Any]:
    servers = [_server_json(vm) for vm in store.list_vms(kind=RowKind.SERVE)]
    snapshots = []
    claimed: set[str] = set()
    for snap in store.list_snapshots():
        mine = [s for s in servers if s["snapshot"] == snap.name]
        claimed.update(s["id"] for s in mine)
        info = snap.info
        snapshots.append({
            "id": snap.id, "name": snap.name, "kind": info.get("kind", "user"), "image": info.get("image", ""),
            "size": info.get("size", 0), "vm_id": snap.vm_id, "path": snap.path, "created": snap.created,
            "key": info.get("key"), "last_used": info.get("last_used"), "hits": info.get("hits"),
            "info": info, "servers": mine,
        })
    return {"snapshots": snapshots, "servers": [s for s in servers if s["id"] not in claimed]}


def _mib(n: int | float | None) -> str:
    return f"{(n or 0) / (1 << 20):.0f}M"


def _client_rows(data: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    servers = [s for snap in data["snapshots"] for s in snap["servers"]] + data["servers"]
    return [(s, c) for s in servers for c in s["clients"]]


def _print_plain(data: dict[str, Any]) -> None:
    print("SNAPSHOT\tKIND\tIMAGE\tSIZE\tSERVER\tCLIENTS\tAGE\tPATH")
    now = time.time()
    for snap in data["snapshots"]:
        servers = ",".join(f"{s['pid']}({s['status']})" for s in snap["servers"]) or "-"
        live = sum(s["clients_live"] for s in snap["servers"])
        print(f"{snap['name']}\t{snap['kind']}\t{snap['image']}\t{_mib(snap['size'])}\t{servers}\t{live}\t"
              f"{now - snap['created']:.0f}s\t{snap['path']}")
    for s in data["servers"]:
        print(f"-\t{s['mem_file']}\t{s['pid']}({s['status']})\t{s['clients_live']}\t-")
    rows = _client_rows(data)
    if rows:
        print()
        print("SERVER\tCLIENT\tSTATE\tFAULTS\tCOPIED\tZERO\tPREFETCH\tP50_US\tP99_US")
        for s, c in rows:
            lat = c.get("latency", {})
            print(f"{s['name']}\t{c['client']}\t{c['state']}\t{c['faults']}\t{_mib(c['bytes_copied'])}\t"
                  f"{_mib(c['zero_bytes'])}\t{c['prefetch']}:{_mib(c['prefetch_bytes'])}\t"
                  f"{lat.get('p50_us', 0)}\t{lat.get('p99_us', 0)}")


def _print_rich(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Snapshots", title_justify="left")
    for col in ("SNAPSHOT", "KIND", "IMAGE", "SIZE", "SERVER", "CLIENTS", "WORKING SET", "AGE"):
        table.add_column(col)
    now = time.time()
    for snap in data["snapshots"]:
        servers = ", ".join(f"pid {s['pid']} ({s['status']})" for s in snap["servers"]) or "-"
        live = sum(s["clients_live"] for s in snap["servers"])
        ws = max((s["working_set_bytes"] for s in snap["servers"]), default=0)
        table.add_row(snap["name"], snap["kind"], snap["image"], _mib(snap["size"]), servers, str(live),
                      _mib(ws) if ws else "-", f"{now - snap['created']:.0f}s")
    for s in data["servers"]:
        table.add_row("-", "-", s["mem_file"] or "-", "-", f"pid {s['pid']} ({s['status']})",
                      str(s["clients_live"]), _mib(s["working_set_bytes"]) if s["working_set_bytes"] else "-", "-")
    console.print(table)
    rows = _client_rows(data)
    if rows:
        clients = Table(title="Memory clients", title_justify="left")
        for col in ("SERVER", "CLIENT", "STATE", "FAULTS", "COPIED", "ZERO", "PREFETCH", "P50", "P99"):
            clients.add_column(col, justify="right" if col in ("FAULTS", "COPIED", "ZERO", "P50", "P99") else "left")
        for s, c in rows:
            lat = c.get("latency", {})
            clients.add_row(
                s["name"], c["client"], c["state"], str(c["faults"]), _mib(c["bytes_copied"]),
                _mib(c["zero_bytes"]), f"{c['prefetch']} {_mib(c['prefetch_bytes'])}",
                f"{lat.get('p50_us', 0)}us", f"{lat.get('p99_us', 0)}us",
            )
        console.print(clients)


def run(args: argparse.Namespace) -> int:
    store = Store()
    try:
        data = collect(store)
    finally:
        store.close()
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif sys.stdout.isatty():
        _print_rich(data)
    else:
        _print_plain(data)
    return 0
