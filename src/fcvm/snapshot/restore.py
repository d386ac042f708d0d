"""Everything a clone needs from its snapshot, checked before the clone creates anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fcvm.core import paths
from fcvm.core.errors import FcvmError, NotFoundError
from fcvm.core.kinds import RowKind
from fcvm.snapshot.create import snapshot_files
from fcvm.snapshot.description import SnapshotDescription, SnapshotError
from fcvm.state import SnapshotRecord, Store
from fcvm.vmm.base import MemBackend, RestoreSpec

if TYPE_CHECKING:
    from fcvm.run.request import RunRequest

UFFD_SOCKET = "uffd.sock"


@dataclass(frozen=True)
class OpenSnapshot:
    record: SnapshotRecord
    description: SnapshotDescription
    directory: Path
    uffd_socket: Path | None

    def restore_spec(self, request: RunRequest, workdir: Path) -> RestoreSpec:
        state, memory = snapshot_files(self.directory)
        preload = None
        if request.memory == MemBackend.UFFD and self.description.hypervisor == "qemu":
            from fcvm.uffd import preload as preload_lib

            preload = preload_lib.find([paths.assets_dir()])
            if preload is None:
                raise FcvmError("the UFFD preload library is not built", hint="run `fcvm setup uffd-preload`")
        return RestoreSpec(state=state, memory=memory, backend=request.memory, uffd_socket=self.uffd_socket,
                           preload=preload, vmm_version=self.description.vmm_version)


def find_snapshot(store: Store, tag: str) -> SnapshotRecord:
    record = store.get_snapshot(tag)
    if record is None:
        raise NotFoundError(f"no snapshot named {tag!r}", hint="see `fcvm snapshot ls`")
    return record


def open_snapshot(store: Store, request: RunRequest) -> OpenSnapshot:
    assert request.snapshot is not None
    record = find_snapshot(store, request.snapshot)
    directory = Path(record.path)
    description = SnapshotDescription.read(directory)
    state, memory = snapshot_files(directory)
    description.check_files(directory, memory, state)
    if (request.cpus, request.mem_mib) != (description.vcpus, description.mem_mib):
        raise SnapshotError(f"snapshot {record.name!r} is of a {description.vcpus}-vCPU {description.mem_mib} MiB "
                            f"machine, not {request.cpus} vCPUs and {request.mem_mib} MiB")
    uffd_socket = None
    if request.memory == MemBackend.UFFD:
        server = store.get_vm(request.serve_id) if request.serve_id else None
        if server is None or server.kind != RowKind.SERVE or not server.live or server.is_stale():
            raise FcvmError("the memory server for this clone is not running", hint="start `fcvm snapshot serve`")
        uffd_socket = Path(server.config["socket"])
    return OpenSnapshot(record, description, directory, uffd_socket)
