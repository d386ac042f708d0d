"""`fcvm snapshot create`: pause a running VM, save its device state, freeze its memory and writable disks
(reflinks), resume it. QEMU VMs are driven over QMP; Firecracker VMs over their API, as Firecracker is.

The snapshot is written under a temporary name, journaled, and renamed into place only when whole, so a crash
at any point leaves nothing a restore could mistake for a snapshot.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from fcvm.core import log, paths
from fcvm.core.errors import FcvmError
from fcvm.core.kinds import NetworkMode, VmmKind, VmStatus
from fcvm.core.proc import ProcessRef
from fcvm.snapshot.description import (
    DriveRecord,
    SnapshotDescription,
    SnapshotError,
    SnapshotKind,
    VolumeRecord,
)
from fcvm.state import SnapshotRecord, Store, VmRecord
from fcvm.state.journal import Journal, process_owner
from fcvm.vmm.qemu import MEMORY_FILE, STATE_FILE

_log = log.get("snapshot")


def snapshot_files(directory: Path) -> tuple[Path, Path]:
    """(state stream, memory file) of the snapshot in `directory`."""
    return directory / STATE_FILE, directory / MEMORY_FILE


def _check_source(vm: VmRecord) -> dict[str, Any]:
    if not vm.live or vm.is_stale():
        raise SnapshotError(f"VM {vm.name!r} is not running ({vm.status})", hint="see `fcvm ls -a`")
    if vm.status != VmStatus.RUNNING:
        raise SnapshotError(f"VM {vm.name!r} is {vm.status}; snapshot it once it runs")
    machine: dict[str, Any] | None = vm.config.get("machine")
    if not machine:
        raise SnapshotError(f"VM {vm.name!r} cannot be snapshotted: its memory is not file-backed")
    return machine


def freeze_disks(directory: Path, disks: dict[str, Path]) -> None:
    """Reflink each writable disk of a paused VM into the snapshot, private to its owner."""
    from fcvm.storage.btrfs import clone_file

    for drive_id, disk in disks.items():
        target = directory / f"{drive_id}.img"
        clone_file(disk, target)
        target.chmod(0o600)


def _save_firecracker(machine: dict[str, Any], directory: Path, disks: dict[str, Path]) -> tuple[str, float]:
    """Firecracker's own sequence: Paused, a Full snapshot, then Resumed. Returns (version, pause seconds)."""
    from fcvm.vmm.firecracker import models as m
    from fcvm.vmm.firecracker.client import Client

    state, memory = snapshot_files(directory)
    with Client(Path(machine["api_socket"]), timeout=120) as client:
        client.negotiate()
        paused_at = time.monotonic()
        client.patch(m.VM, m.Vm("Paused"))
        try:
            client.put(m.SNAPSHOT_CREATE, m.SnapshotCreateParams(
                snapshot_path=str(state), mem_file_path=str(memory), snapshot_type="Full"))
            freeze_disks(directory, disks)
        finally:
            client.patch(m.VM, m.Vm("Resumed"))
        return client.version_text or "", time.monotonic() - paused_at


def _save_qemu(machine: dict[str, Any], directory: Path, disks: dict[str, Path]) -> tuple[str, float]:
    from fcvm.vmm.qemu import Qmp, qemu_version, save_snapshot

    qmp_socket = Path(machine["qmp_socket"])
    with Qmp(qmp_socket) as qmp:
        version = qemu_version(qmp)
    state, memory = snapshot_files(directory)
    pause = save_snapshot(qmp_socket, state=state, memory=memory, ram_file=Path(machine["mem_file"]),
                          frozen=lambda: freeze_disks(directory, disks), disks=list(disks.values()))
    return version, pause


def create_snapshot(store: Store, vm: VmRecord, tag: str, *, kind: SnapshotKind = SnapshotKind.USER,
                    extra_info: dict[str, Any] | None = None) -> SnapshotRecord:
    machine = _check_source(vm)
    if store.get_snapshot(tag) is not None:
        raise FcvmError(f"a snapshot named {tag!r} already exists", hint=f"fcvm snapshot rm {tag}, or another --tag")
    base = paths.ensure_dir(paths.snapshots_dir(), 0o700)
    me = ProcessRef.self()
    journal = Journal(store, process_owner(me))
    partial = base / f".{tag}.{os.getpid()}.partial"
    final = base / tag
    entries = [journal.record("dir", path=str(partial)), journal.record("dir", path=str(final))]
    renamed = False
    try:
        partial.mkdir(mode=0o700)
        drives = [DriveRecord(**d) for d in machine["drives"]]
        # A read-only drive is a shared asset: the clone uses it in place. A writable one is frozen here.
        disks = {d.drive_id: Path(d.path) for d in drives if not d.read_only}
        hypervisor = VmmKind(machine["vmm"])
        save = _save_firecracker if hypervisor == VmmKind.FIRECRACKER else _save_qemu
        version, pause = save(machine, partial, disks)
        description = SnapshotDescription(
            hypervisor=hypervisor, vmm_version=version, vcpus=machine["vcpus"], mem_mib=machine["mem_mib"],
            drives=tuple(d if d.read_only else DriveRecord(d.drive_id, False, d.root, f"{d.drive_id}.img", d.path)
                         for d in drives),
            guest_mac=machine["guest_mac"], tap=machine["tap"], image=vm.image,
            network_mode=NetworkMode(machine["network_mode"]), source_vm=vm.name,
            kernel=machine.get("kernel", ""), initrd=machine.get("initrd", ""),
            volumes=tuple(VolumeRecord(**v) for v in machine.get("volumes", [])),
            cmd=tuple(vm.config.get("cmd", [])), agent_credential=machine.get("agent_credential", ""),
        )
        description.write(partial)
        try:
            os.rename(partial, final)
        except OSError as exc:  # another snapshot took the tag meanwhile; its directory is not ours to remove
            raise FcvmError(f"a snapshot named {tag!r} already exists") from exc
        renamed = True
        size = sum(f.stat().st_blocks * 512 for f in final.iterdir())
        record = store.add_snapshot(tag, str(final), vm_id=vm.id, info={
            "kind": kind, "image": vm.image, "source": vm.name, "hypervisor": hypervisor, "size": size,
            "pause_s": round(pause, 3), "mem_mib": machine["mem_mib"], **(extra_info or {}),
        })
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if renamed:
            shutil.rmtree(final, ignore_errors=True)
        for entry in entries:
            journal.forget(entry)
        raise
    for entry in entries:
        journal.forget(entry)
    _log.info("snapshot %s of %s: paused %.3f s", tag, vm.name, pause)
    return record
