"""`fcvm podman run`: a container in a new microVM, in the foreground or detached (-d)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from fcvm.core import paths
from fcvm.core.errors import FcvmError, UsageError
from fcvm.state import Store
from fcvm.supervisor import RunRequest, VmSupervisor, VolumeMap, choose_hypervisor, env_pairs, generate_name

_IMAGE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-/:@")


def _check_image(image: str) -> None:
    if not image or not set(image) <= _IMAGE_CHARS or image.startswith(("/", ":", "-")) or "//" in image:
        raise UsageError(f"invalid image name {image!r}", hint="e.g. localhost/web or docker.io/library/nginx:alpine")


def build_request(args: argparse.Namespace) -> RunRequest:
    from fcvm.network import default_mode
    from fcvm.network.ports import parse_publish_all

    _check_image(args.image)
    mode = args.network or default_mode()
    if mode not in ("bridged", "rootless"):
        raise UsageError(f"unknown network mode {mode!r}: use bridged or rootless")
    hypervisor, binary = choose_hypervisor(args.hypervisor, args.firecracker_bin)
    jailer = _jailer(args, hypervisor, binary, mode)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return RunRequest(
        image=args.image,
        name=args.name or generate_name(),
        cmd=command,
        env=env_pairs(args.env),
        publish=parse_publish_all(args.publish),
        maps=[VolumeMap.parse(spec) for spec in args.map],
        network=mode,
        hypervisor=hypervisor,
        firecracker_bin=binary,
        jailer=jailer,
        cpus=args.cpu,
        mem_mib=args.mem,
        health_url=args.health_check,
        user=args.user or "",
        workdir=args.workdir or "",
        kernel=Path(args.kernel) if args.kernel else None,
        initrd=Path(args.initrd) if args.initrd else None,
        remove=args.rm,
        boot_timeout=args.boot_timeout,
    )


def _jailer(args: argparse.Namespace, hypervisor: str, firecracker: Path | None, mode: str) -> Path | None:
    if not args.jailer:
        if args.jailer_bin:
            raise UsageError("--jailer-bin needs --jailer")
        return None
    if hypervisor != "firecracker" or firecracker is None:
        raise UsageError("--jailer applies to Firecracker only", hint="add --hypervisor firecracker")
    if os.geteuid() != 0:
        raise UsageError("--jailer needs root: the jailer chroots, creates devices and cgroups, and changes uid")
    if mode != "bridged":
        raise UsageError("--jailer needs --network bridged: the jailer joins the VM's network namespace by path")
    if "firecracker" not in firecracker.name:  # the jailer refuses any other binary
        raise UsageError(f"--jailer runs only a binary whose name contains 'firecracker', not {firecracker.name!r}",
                         hint="name (or copy) the binary firecracker")
    from fcvm.vmm.firecracker.jail import cgroup2_mount, find_jailer

    if cgroup2_mount() is None:
        raise FcvmError("--jailer needs a cgroup v2 hierarchy, and none is mounted",
                        hint="mount one: mount -t cgroup2 none /sys/fs/cgroup/unified")
    return find_jailer(args.jailer_bin, firecracker)


def run(args: argparse.Namespace) -> int:
    if args.cpu < 1 or args.mem < 128:
        raise UsageError("--cpu must be at least 1 and --mem at least 128 (MiB)")
    if args.boot_timeout <= 0:
        raise UsageError("--boot-timeout must be positive")
    request = build_request(args)
    if args.detach:
        return _detach(request.name, request.boot_timeout)
    return VmSupervisor(request).run()


def _detach(name: str, boot_timeout: float) -> int:
    """Re-run ourselves in the foreground in a new session; return once the VM is running."""
    argv = [a for a in sys.argv[1:] if a not in ("-d", "--detach")]
    if "--name" not in argv:
        run_at = next(i for i in range(len(argv) - 1) if argv[i : i + 2] == ["podman", "run"])
        argv[run_at + 2 : run_at + 2] = ["--name", name]
    log_path = paths.ensure_dir(paths.data_dir() / "logs") / f"{name}.log"
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "fcvm", *argv], stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "FCVM_DETACHED": "1"},
        )
    store = Store()
    deadline = time.monotonic() + boot_timeout + 60  # the child gives up first, with the real reason
    while time.monotonic() < deadline:
        code = child.poll()
        vm = store.get_vm(name)
        if vm is not None and vm.pid == child.pid and vm.status == "running" and vm.health != "starting":
            print(vm.id)
            return 0
        if code is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise FcvmError(f"VM {name} failed to start: {' / '.join(tail) or f'exit code {code}'}")
        time.sleep(0.1)
    raise FcvmError(f"VM {name} did not become ready within {boot_timeout + 60:.0f} s", hint=f"see {log_path}")
