"""`fcvm snapshot serve`: serve a snapshot's memory file to clones over userfaultfd.

`fcvm snapshot serve SNAPSHOT` uses <snapshot dir>/memory, listens on <snapshot dir>/uffd.sock and keeps
the working set in <snapshot dir>/working-set. The low-level form takes --mem-file and --socket.
Either way the server is a `serve` row in the state store (its metrics live in the row's config), and
on SIGTERM it first stops the clones recorded with its id as serve_id, then exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from fcvm.core import log
from fcvm.core.errors import FcvmError, NotFoundError, UsageError
from fcvm.core.kinds import RowKind
from fcvm.core.proc import ProcessRef
from fcvm.run import cleanup
from fcvm.state.journal import Journal
from fcvm.state.store import NameInUse, Store, VmRecord
from fcvm.uffd.server import ServeConfig, Server, parse_size

_log = log.get("uffd")


def _resolve(args: argparse.Namespace, store: Store) -> tuple[str, Path, Path, Path | None, str | None]:
    """(row name, memory file, socket, working-set path, snapshot name)."""
    if args.snapshot:
        if args.mem_file or args.socket:
            raise UsageError("give either a SNAPSHOT or --mem-file/--socket, not both")
        snap = store.get_snapshot(args.snapshot)
        if snap is None:
            raise NotFoundError(f"no snapshot named {args.snapshot!r}", hint="see `fcvm snapshot ls`")
        directory = Path(snap.path)
        return f"serve-{snap.name}", directory / "memory", directory / "uffd.sock", directory / "working-set", \
            snap.name
    if not (args.mem_file and args.socket):
        raise UsageError("give a SNAPSHOT, or both --mem-file and --socket")
    sock = Path(args.socket).absolute()
    digest = hashlib.sha1(str(sock).encode()).hexdigest()[:6]
    return f"serve-{sock.stem}-{digest}", Path(args.mem_file).absolute(), sock, None, None


def _create_row(store: Store, name: str, config: dict[str, Any]) -> VmRecord:
    try:
        return store.create_vm(name, kind=RowKind.SERVE, process=ProcessRef.self(), config=config)
    except NameInUse:
        existing = store.get_vm(name)
        if existing is None or not existing.is_stale():
            raise FcvmError(
                f"a memory server named {name!r} is already running (pid {existing.pid if existing else '?'})",
                hint="stop it first, or serve on another socket",
            ) from None
        cleanup.reap_stale(store)
        return store.create_vm(name, kind=RowKind.SERVE, process=ProcessRef.self(), config=config)


def stop_clones(store_path: str, serve_id: str, server: Server) -> None:
    """Stop every live clone served by `serve_id`, all at once, while the server keeps serving."""
    store = Store(store_path)
    try:
        clones = [vm for vm in store.list_vms(kind=RowKind.CLONE) if vm.serve_id == serve_id]
        threads = []
        for vm in clones:
            proc = vm.process
            if proc is None or not proc.alive():
                continue
            server.note("clone-stop", clone=vm.id, name=vm.name, pid=proc.pid)
            _log.info("stopping clone %s (pid %d) before exiting", vm.name, proc.pid)

            def stop(vm: VmRecord = vm, proc: ProcessRef = proc) -> None:
                proc.terminate(timeout=10)
                server.note("clone-stopped", clone=vm.id, name=vm.name, pid=proc.pid, alive=proc.alive())

            thread = threading.Thread(target=stop, daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    # Everything the server writes (socket, working set, metrics) belongs to the snapshot, whose memory file is
    # the guest's memory: its owner's alone. Set while this process has a single thread (umask is per process).
    os.umask(0o077)
    store = Store()
    name, mem_file, sock, ws_path, snapshot = _resolve(args, store)
    if not mem_file.is_file():
        raise NotFoundError(f"memory file {mem_file} does not exist")
    try:
        fault_around = parse_size(args.fault_around)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if fault_around < 4096 or fault_around & (fault_around - 1):
        raise UsageError(f"--fault-around {args.fault_around}: must be a power of two of at least 4K")
    base_config: dict[str, Any] = {
        "snapshot": snapshot, "socket": str(sock), "mem_file": str(mem_file),
        "prefetch": args.prefetch == "on", "fault_around": fault_around, "metrics": {},
    }
    row = _create_row(store, name, base_config)
    journal = Journal(store, row.id)
    publish_lock = threading.Lock()
    last: dict[str, Any] = {}

    def publish(metrics: dict[str, Any]) -> None:
        with publish_lock:
            last["metrics"] = metrics
            store.update_config(row.id, metrics=metrics)

    code = 1
    try:
        entry = journal.record("socket", path=str(sock))
        server = Server(ServeConfig(
            mem_file=mem_file, socket=sock, fault_around=fault_around, prefetch=args.prefetch == "on",
            working_set=ws_path, publish=publish,
            stop_clones=lambda srv: stop_clones(store.path, row.id, srv),
        ))
        store.update_vm(row.id, status="running", started=server.started)
        server.serve_forever(install_signals=True)
        journal.forget(entry)
        code = 0
    except (OSError, ValueError) as exc:
        raise FcvmError(f"memory server failed: {exc}") from exc
    finally:
        if args.metrics_json and last.get("metrics"):
            tmp = Path(f"{args.metrics_json}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(last["metrics"], indent=1))
            os.replace(tmp, args.metrics_json)
        cleanup.finish_vm(store, row, exit_code=code)
        store.close()
    return code
