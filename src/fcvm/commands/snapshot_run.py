"""`fcvm snapshot run --snapshot TAG | --pid SERVE_PID [--name N] [-p ...] [-d] [--rm] [--exec CMD]`: a clone.

`--snapshot` maps the snapshot's memory file privately (clones share its unmodified pages); `--pid` takes
memory from that `fcvm snapshot serve` process over userfaultfd. Like `podman run`: foreground by default,
`-d` detaches, Ctrl-C stops the clone and removes what it created. `--exec CMD` runs one command in the
clone's container, prints its output, removes the clone and exits with the command's code.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

from fcvm.core.errors import FcvmError, NotFoundError, UsageError
from fcvm.core.kinds import NetworkMode, RowKind, VmmKind
from fcvm.run.request import RunRequest, generate_name, validate_name
from fcvm.snapshot.description import SnapshotDescription
from fcvm.snapshot.restore import find_snapshot
from fcvm.state import Store, VmRecord
from fcvm.vmm.base import MemBackend


def _server(store: Store, pid: int) -> VmRecord:
    server = next((vm for vm in store.list_vms(kind=RowKind.SERVE) if vm.pid == pid), None)
    if server is None or server.is_stale():
        raise NotFoundError(f"no memory server runs as pid {pid}", hint="see `fcvm snapshot ls`")
    if not server.config.get("snapshot"):
        raise UsageError(f"memory server {pid} serves a bare --mem-file, not a snapshot: clones need a snapshot")
    return server


def build_request(args: argparse.Namespace, store: Store) -> RunRequest:
    return clone_request(
        store, snapshot=args.snapshot, serve_pid=args.pid, name=args.name, publish=args.publish,
        network=NetworkMode(args.network) if args.network else None, allow_host_loopback=args.allow_host_loopback,
        firecracker_bin=args.firecracker_bin, remove=args.rm or bool(args.exec), boot_timeout=args.boot_timeout)


def clone_request(store: Store, *, snapshot: str | None, serve_pid: int | None = None, name: str | None = None,
                  publish: Sequence[str] = (), network: NetworkMode | None = None, allow_host_loopback: bool = False,
                  firecracker_bin: str | None = None, remove: bool = False, boot_timeout: float) -> RunRequest:
    """The run of a clone of `snapshot` (memory from the file), or of the snapshot `serve_pid` serves (memory
    from that page server)."""
    from fcvm.network import default_mode
    from fcvm.network.ports import parse_publish_all

    if (snapshot is None) == (serve_pid is None):
        raise UsageError("give --snapshot TAG (memory from the file) or --pid SERVE_PID (memory from that server)")
    server = _server(store, serve_pid) if serve_pid is not None else None
    tag = str(server.config["snapshot"]) if server else snapshot
    assert tag is not None
    record = find_snapshot(store, tag)
    description = SnapshotDescription.read(Path(record.path))
    binary = None
    if description.hypervisor == VmmKind.FIRECRACKER:
        from fcvm.vmm.firecracker.binary import find_firecracker

        binary = find_firecracker(firecracker_bin)
        if binary is None:
            raise FcvmError("this snapshot was taken by Firecracker, and no firecracker binary is found",
                            hint="fcvm setup firecracker, --firecracker-bin, or FCVM_FIRECRACKER_BIN")
    return RunRequest(
        image=description.image,
        name=validate_name(name) if name is not None else generate_name(),
        cmd=description.cmd,
        publish=tuple(parse_publish_all(list(publish))),
        network=network or default_mode(),
        allow_host_loopback=allow_host_loopback,
        hypervisor=description.hypervisor,
        firecracker_bin=binary,
        cpus=description.vcpus,
        mem_mib=description.mem_mib,
        remove=remove,
        boot_timeout=boot_timeout,
        snapshot=record.name,
        memory=MemBackend.UFFD if server else MemBackend.FILE,
        serve_id=server.id if server else None,
    )


def run(args: argparse.Namespace) -> int:
    store = Store()
    request = build_request(args, store)
    if args.exec:
        return _run_once(request, shlex.split(args.exec))
    if args.detach:
        from fcvm.run.detach import detach

        detach(request)
        return 0
    from fcvm.run.supervisor import VmSupervisor

    return VmSupervisor(request, store).run()


def _run_once(request: RunRequest, argv: list[str]) -> int:
    """Clone in the background, run `argv` in its container, stop and remove the clone."""
    from fcvm.commands.exec_ import exec_in
    from fcvm.commands.stop import stop_vm
    from fcvm.run.detach import detach

    if not argv:
        raise UsageError("--exec needs a command")
    store = Store()
    vm_id = detach(request, quiet=True)
    try:
        return exec_in(store.require_vm(vm_id), argv)
    finally:
        stop_vm(store, vm_id, grace=5)
