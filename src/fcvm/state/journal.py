"""The undo journal: record a host resource *before* creating it, forget it *after* destroying it.

Replaying an owner's entries newest-first undoes everything it built, even after a SIGKILL.
The handlers that know how to undo each kind live in the layers that create them; `fcvm.cleanup`
maps kinds to handlers.
"""

from __future__ import annotations

from typing import Any

from fcvm.core.proc import ProcessRef
from fcvm.state.store import JournalEntry, Store


class Journal:
    def __init__(self, store: Store, owner: str) -> None:
        self.store = store
        self.owner = owner

    def record(self, kind: str, **data: Any) -> int:
        """Call before creating the resource; undo handlers must tolerate it never having existed."""
        return self.store.journal_add(self.owner, kind, data)

    def forget(self, entry_id: int) -> None:
        """Call after the resource is gone."""
        self.store.journal_remove(entry_id)

    def entries(self) -> list[JournalEntry]:
        return self.store.journal_entries(self.owner)


def process_owner(process: ProcessRef) -> str:
    """A journal owner that is a process rather than a VM row (e.g. `fcvm snapshot create` while it works)."""
    return f"process:{process.pid}:{process.start}"


def owner_alive(owner: str) -> bool:
    """Whether a process-owned journal's process still runs (then its entries are not orphans)."""
    kind, _, rest = owner.partition(":")
    if kind != "process":
        return False
    pid, _, start = rest.partition(":")
    return ProcessRef(int(pid), int(start)).alive()
