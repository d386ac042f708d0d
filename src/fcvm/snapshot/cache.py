"""The automatic snapshot cache behind warm `fcvm podman run`s.

Two kinds of entry, both ordinary snapshots of kind `cache`:
- **startup**: taken once the container first reports healthy. Keyed by everything the container can see
  (image, cmd, env, user, workdir, name and hostname, volume guest paths and modes, machine shape, and the
  kernel, initramfs (which names the agent), rootfs and VMM), so a run with that key starts with its container
  already running.
- **prestart**: taken once the image is loaded in the guest and podman is warm, before anything of the run
  reaches the agent. Keyed by the image, machine shape and assets; any run of that image can use it, and the
  agent then receives the run's plan.

Keys are content hashes: a changed kernel, initramfs, rootfs or agent changes them, so a stale entry is never
restored. An entry holds guest memory (a startup entry: the run's env values, as podman's container storage
does); its files are its owner's only. `--no-snapshot` or FCVM_NO_SNAPSHOT=1 bypasses the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fcvm.core import log, paths
from fcvm.snapshot.description import SnapshotKind
from fcvm.state import SnapshotRecord, Store

_log = log.get("snapshot.cache")

NO_SNAPSHOT_ENV = "FCVM_NO_SNAPSHOT"
CACHE_MAX_ENV = "FCVM_SNAPSHOT_CACHE_MAX"
DEFAULT_CACHE_MAX = 16 << 30  # bytes allocated on disk; memory files are sparse and disks mostly shared extents
_KEY_VERSION = "1"


class CacheLevel(StrEnum):
    STARTUP = "startup"
    PRESTART = "prestart"


def disabled_by_environment() -> bool:
    return os.environ.get(NO_SNAPSHOT_ENV, "") not in ("", "0")


def cache_max_bytes() -> int:
    from fcvm.uffd.server import parse_size

    text = os.environ.get(CACHE_MAX_ENV)
    return parse_size(text) if text else DEFAULT_CACHE_MAX


@dataclass(frozen=True)
class RunShape:
    """Everything a run's cache keys depend on."""

    image_id: str
    hypervisor: str
    vcpus: int
    mem_mib: int
    assets: tuple[str, ...]  # content-addressed names of the kernel, initramfs and rootfs (the initramfs names
    # the agent's sources)
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    user: str
    workdir: str
    name: str
    volumes: tuple[tuple[str, bool], ...]  # guest path, read-only

    def _digest(self, fields: dict[str, Any]) -> str:
        text = json.dumps({"v": _KEY_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def key(self, level: CacheLevel) -> str:
        machine = {"image": self.image_id, "hypervisor": self.hypervisor, "vcpus": self.vcpus,
                   "mem_mib": self.mem_mib, "assets": list(self.assets)}
        if level == CacheLevel.PRESTART:
            return self._digest(machine)
        return self._digest({**machine, "cmd": list(self.cmd), "env": [list(p) for p in self.env],
                             "user": self.user, "workdir": self.workdir, "name": self.name,
                             "volumes": [list(v) for v in self.volumes]})


def tag_for(level: CacheLevel, key: str) -> str:
    return f"cache-{level}-{key}"


def is_cache(record: SnapshotRecord) -> bool:
    return record.info.get("kind") == SnapshotKind.CACHE


def lookup(store: Store, shape: RunShape) -> tuple[CacheLevel, SnapshotRecord] | None:
    """The best entry that fits: startup, then prestart. Counts the hit and the use."""
    for level in CacheLevel:
        record = store.get_snapshot(tag_for(level, shape.key(level)))
        if record is not None and Path(record.path).is_dir():
            info = record.info
            store.update_snapshot_info(record.id, {**info, "hits": int(info.get("hits", 0)) + 1,
                                                   "last_used": time.time()})
            return level, record
    return None


@contextlib.contextmanager
def creation_claim(tag: str) -> Iterator[bool]:
    """True for the one process that may create entry `tag` now. Two cold runs of one image at once make one
    entry; the other does not wait. The claim is a lock the kernel drops if its holder dies."""
    lock_dir = paths.ensure_dir(paths.snapshots_dir(), 0o700)
    fd = os.open(lock_dir / f".{tag}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_entry(store: Store, record: SnapshotRecord) -> None:
    shutil.rmtree(record.path, ignore_errors=True)
    store.delete_snapshot(record.id)
    (paths.snapshots_dir() / f".{record.name}.lock").unlink(missing_ok=True)


def entries(store: Store) -> list[SnapshotRecord]:
    return [r for r in store.list_snapshots() if is_cache(r)]


def entries_in_use(store: Store) -> set[str]:
    """Snapshots a live VM was restored from (its memory may be mapped from the entry's file)."""
    return {str(vm.config["snapshot"]) for vm in store.list_vms() if vm.config.get("snapshot")}


def prune(store: Store, *, everything: bool = False, limit: int | None = None) -> list[SnapshotRecord]:
    """Remove cache entries: all of them, or the least recently used until the rest fit in `limit` bytes.
    Entries a live VM was restored from are kept. Returns what was removed."""
    limit = cache_max_bytes() if limit is None else limit
    busy = entries_in_use(store)
    candidates = sorted(entries(store), key=lambda r: float(r.info.get("last_used", r.created)))
    total = sum(int(r.info.get("size", 0)) for r in candidates)
    removed = []
    for record in candidates:
        if not everything and total <= limit:
            break
        if record.name in busy:
            continue
        remove_entry(store, record)
        total -= int(record.info.get("size", 0))
        removed.append(record)
        _log.info("removed cache entry %s", record.name)
    return removed
