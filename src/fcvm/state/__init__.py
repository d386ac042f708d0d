"""The sqlite state store: VMs, snapshots, allocations and the cleanup journal."""

from fcvm.state.store import (
    LIVE_STATUSES,
    AllocationExhausted,
    NameInUse,
    SnapshotRecord,
    Store,
    VmRecord,
)

__all__ = ["LIVE_STATUSES", "AllocationExhausted", "NameInUse", "SnapshotRecord", "Store", "VmRecord"]
