"""`fcvm podman run`: a container in a new microVM, in the foreground or detached (-d)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fcvm.core.errors import FcvmError, UsageError
from fcvm.core.kinds import NetworkMode, VmmKind
from fcvm.run.request import RunRequest, VolumeMap, env_pairs, generate_name, validate_name
from fcvm.vmm.select import choose_hypervisor

_IMAGE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-/:@")


def _check_image(image: str) -> None:
    if not image or not set(image) <= _IMAGE_CHARS or image.startswith(("/", ":", "-")) or "//" in image:
        raise UsageError(f"invalid image name {image!r}", hint="e.g. localhost/web or docker.io/library/nginx:alpine")


def build_request(args: argparse.Namespace) -> RunRequest:
    from fcvm.network import default_mode
    from fcvm.network.ports import parse_publish_all

    _check_image(args.image)
    name = validate_name(args.name) if args.name is not None else generate_name()
    mode = NetworkMode(args.network) if args.network else default_mode()
    hypervisor, binary = choose_hypervisor(args.hypervisor, args.firecracker_bin)
    jailer = _jailer(args, hypervisor, binary, mode)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return RunRequest(
        image=args.image,
        name=name,
        cmd=tuple(command),
        env=env_pairs(args.env),
        publish=tuple(parse_publish_all(args.publish)),
        maps=tuple(VolumeMap.parse(spec) for spec in args.map),
        network=mode,
        allow_host_loopback=args.allow_host_loopback,
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
        use_cache=not args.no_snapshot,
    )


def _jailer(args: argparse.Namespace, hypervisor: VmmKind, firecracker: Path | None,
            mode: NetworkMode) -> Path | None:
    if not args.jailer:
        if args.jailer_bin:
            raise UsageError("--jailer-bin needs --jailer")
        return None
    if hypervisor != VmmKind.FIRECRACKER or firecracker is None:
        raise UsageError("--jailer applies to Firecracker only", hint="add --hypervisor firecracker")
    if os.geteuid() != 0:
        raise UsageError("--jailer needs root: the jailer chroots, creates devices and cgroups, and changes uid")
    if mode != NetworkMode.BRIDGED:
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
    from fcvm.run.warm import choose_start, run_with_fallback
    from fcvm.state import Store

    request = choose_start(build_request(args), Store())
    if args.detach:
        from fcvm.run.detach import detach

        detach(request)
        return 0
    return run_with_fallback(request)
