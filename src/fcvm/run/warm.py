"""Warm starts: which cache entry a `podman run` restores from, the fallback to a cold boot when the restore
fails, and the entries a cold run leaves behind (see fcvm.snapshot.cache)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from fcvm.core import log
from fcvm.core.errors import FcvmError
from fcvm.core.kinds import VmmKind
from fcvm.run.request import RunRequest
from fcvm.snapshot.cache import (
    CacheLevel,
    RunShape,
    creation_claim,
    disabled_by_environment,
    lookup,
    prune,
    remove_entry,
    tag_for,
)
from fcvm.snapshot.description import SnapshotKind
from fcvm.state import SnapshotRecord, Store

_log = log.get("snapshot.cache")


def run_shape(request: RunRequest) -> RunShape | None:
    """The run's cache identity, or None when it cannot use the cache (no built assets, a pulled image,
    a jailed or custom-kernel run)."""
    from fcvm.guest import find_kernel, find_rootfs
    from fcvm.storage.images import image_id

    if not request.use_cache or disabled_by_environment() or request.jailer or request.kernel or request.initrd:
        return None
    kernel = find_kernel(refresh_initramfs=True)
    rootfs = find_rootfs()
    identity = image_id(request.image)
    if kernel is None or rootfs is None or identity is None:
        return None
    boot_image = kernel.vmlinux if request.hypervisor == VmmKind.FIRECRACKER else kernel.bzimage
    return RunShape(
        image_id=identity, hypervisor=request.hypervisor, vcpus=request.cpus, mem_mib=request.mem_mib,
        assets=(f"{boot_image.parent.name}/{boot_image.name}", kernel.initramfs.name, rootfs.name),
        cmd=request.cmd, env=tuple(sorted(request.env.items())), user=request.user, workdir=request.workdir,
        name=request.name, volumes=tuple((m.guest_path, m.read_only) for m in request.maps),
    )


def choose_start(request: RunRequest, store: Store) -> RunRequest:
    """The request restored from the best cache entry that fits, or unchanged (a cold boot)."""
    shape = run_shape(request)
    if shape is None:
        return request
    found = lookup(store, shape)
    if found is None:
        return request
    level, record = found
    _log.info("starting warm from the %s entry %s", level, record.name)
    # On its own copy of the entry's memory: a warm VM can be snapshotted like a cold one (and leave a startup
    # entry of its own), at the cost of sharing no memory pages with other runs of the entry.
    return replace(request, snapshot=record.name, warm=level, snapshottable=True)


def run_with_fallback(request: RunRequest, vm_id: str | None = None,
                      on_ready: Callable[[], None] | None = None) -> int:
    """Run the request; a warm start whose restore fails is retried cold, and its entry removed. `on_ready`: see
    VmSupervisor."""
    from fcvm.run.supervisor import RestoreFailed, VmSupervisor

    try:
        return VmSupervisor(request, vm_id=vm_id, on_ready=on_ready).run()
    except RestoreFailed as exc:
        if request.warm is None:
            raise
        assert request.snapshot is not None
        _log.warning("the cache entry %s could not be restored (%s): removed; booting cold", request.snapshot, exc)
        store = Store()
        record = store.get_snapshot(request.snapshot)
        if record is not None:
            remove_entry(store, record)
        return VmSupervisor(replace(request, snapshot=None, warm=None), vm_id=vm_id, on_ready=on_ready).run()


def take_entry(vm_id: str, shape: RunShape, level: CacheLevel) -> SnapshotRecord | None:
    """Snapshot the running VM as a cache entry, unless one exists or another run is taking it right now
    (that run does not wait: it boots on and leaves the entry to the first). Returns the entry it took."""
    from fcvm.snapshot.create import create_snapshot

    tag = tag_for(level, shape.key(level))
    store = Store()  # this thread's own connection
    try:
        with creation_claim(tag) as mine:
            if not mine or store.get_snapshot(tag) is not None:
                return None
            vm = store.get_vm(vm_id)
            if vm is None:
                return None
            record = create_snapshot(store, vm, tag, kind=SnapshotKind.CACHE,
                                     extra_info={"level": level, "key": shape.key(level), "hits": 0})
        prune(store)  # the least recently used entries make room
        return record
    except FcvmError as exc:  # the run goes on without the entry
        _log.warning("could not add the %s cache entry: %s", level, exc)
        return None
    finally:
        store.close()
