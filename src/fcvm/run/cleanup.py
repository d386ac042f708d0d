"""Replays undo journals and reaps rows whose owning process died without cleaning up.

Sits above every layer that creates host resources, so it can map each journal kind to its handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fcvm.core import log
from fcvm.core.kinds import VmStatus
from fcvm.core.proc import ProcessRef
from fcvm.core.wait import wait_until
from fcvm.state.store import JournalEntry, Store, VmRecord, owner_gone

# Loggers are fetched where something is logged: `fcvm ls` with nothing to reap never imports logging.

Handler = Callable[[dict[str, object]], None]


def _handlers() -> dict[str, Handler]:
    from fcvm.core import undo as core_undo
    from fcvm.network import undo as network_undo
    from fcvm.storage import undo as storage_undo

    return {**core_undo.HANDLERS, **network_undo.HANDLERS, **storage_undo.HANDLERS}


def replay(store: Store, owner: str) -> list[str]:
    """Undo every journaled resource of `owner`, newest first. Returns the failures (kept for gc)."""
    handlers = _handlers()
    failures: list[str] = []
    for entry in store.journal_entries(owner):
        try:
            _undo(handlers, entry)
        except Exception as exc:  # keep going: one stuck resource must not strand the rest
            failures.append(f"{entry.kind} {entry.data}: {exc}")
            log.get("cleanup").warning("could not undo %s %s: %s", entry.kind, entry.data, exc)
            continue
        store.journal_remove(entry.id)
    return failures


def _undo(handlers: dict[str, Handler], entry: JournalEntry) -> None:
    handler = handlers.get(entry.kind)
    if handler is None:
        raise RuntimeError(f"no undo handler for journal kind {entry.kind!r}")
    log.get("cleanup").debug("undo %s %s", entry.kind, entry.data)
    handler(entry.data)


def finish_vm(store: Store, vm: VmRecord, *, exit_code: int | None) -> list[str]:
    """Release everything `vm` holds and mark it exited, unless one of its processes still runs (not even SIGKILL
    ended it): then it stays `stopping`, holding its allocations, with no owner, so that the next reaper tries
    again and nobody waits for us."""
    failures = replay(store, vm.id)
    if any(entry.kind == "process" for entry in store.journal_entries(vm.id)):
        store.update_vm(vm.id, status=VmStatus.STOPPING, pid=None, pid_start=None)
        return failures
    store.release_allocations(vm.id)
    store.update_vm(vm.id, status=VmStatus.EXITED, exited=time.time(), exit_code=exit_code, health="unknown")
    return failures


def reap_stale(store: Store, *, wait: float = 60.0) -> list[VmRecord]:
    """Clean up after live rows whose process is gone. Safe to run from many processes at once.

    Returns once no row is being reaped by another process either (waiting up to `wait` seconds), so what the
    caller then reads is settled: a VM shows as exited only once nothing of it runs."""
    reaped: list[VmRecord] = []
    me = ProcessRef.self()

    def settled() -> bool:
        busy = False
        for vm_id, status, pid, pid_start in store.live_vm_owners():
            if owner_gone(pid, pid_start):
                # Take ownership of the row first, so that concurrent reapers skip it and a reaper that dies
                # midway leaves a row that is stale again. Once per call: a row left unfinished stays stale.
                if any(vm_id == done.id for done in reaped):
                    continue
                if _take_over(store, vm_id, pid, pid_start, me):
                    vm = store.require_vm(vm_id)
                    log.get("cleanup").info("reaping %s (%s): its process %s is gone", vm.name, vm.id, pid)
                    finish_vm(store, vm, exit_code=None)
                    reaped.append(vm)
                else:
                    busy = True  # another reaper took it over since we listed it: look again
            elif status == VmStatus.STOPPING:
                busy = True  # another process is reaping it (only reapers set `stopping`): let it finish
        return not busy

    if not wait_until(settled, wait, interval=0.05):
        log.get("cleanup").warning("another fcvm process is still cleaning up after a VM; its status may change")
    return reaped


def _take_over(store: Store, vm_id: str, pid: int | None, pid_start: int | None, me: ProcessRef) -> bool:
    with store.transaction() as db:
        cursor = db.execute(
            "UPDATE vms SET pid = ?, pid_start = ?, status = 'stopping'"
            " WHERE id = ? AND pid IS ? AND pid_start IS ? AND status != 'exited'",
            (me.pid, me.start, vm_id, pid, pid_start),
        )
        return cursor.rowcount == 1
