"""`fcvm doctor`: what this host can do, and the fix for what it cannot."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from fcvm.core import host, paths, proc
from fcvm.core.errors import FcvmError
from fcvm.core.kinds import CheckStatus


@dataclass
class Check:
    name: str
    status: CheckStatus
    detail: str
    fix: str = ""
    essential: bool = False


def _version(argv: list[str]) -> str:
    try:
        result = proc.run(argv, timeout=20, check=False)
    except FcvmError as exc:
        return str(exc)
    text = (result.stdout or result.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else f"exit {result.returncode}"


def _kvm() -> Check:
    kvm = host.kvm_status()
    if kvm.usable:
        return Check("kvm", CheckStatus.OK, kvm.detail)
    return Check(
        "kvm", CheckStatus.WARN, kvm.detail, "QEMU falls back to TCG (slower); Firecracker needs a real KVM host"
    )


def _firecracker() -> Check:
    from fcvm.vmm.firecracker.binary import describe_binary, find_firecracker

    binary = find_firecracker(None)
    if binary is None:
        return Check(
            "firecracker",
            CheckStatus.MISSING,
            "no firecracker binary (FCVM_FIRECRACKER_BIN, PATH)",
            "fcvm setup firecracker, or FCVM_FIRECRACKER_BIN=$(which fcvm-fc-mock) for the mock",
        )
    return Check("firecracker", CheckStatus.OK, describe_binary(binary))


def _jailer() -> Check:
    """Only `--jailer` needs it: the release's jailer beside Firecracker, and a cgroup v2 hierarchy."""
    from fcvm.core.errors import FcvmError
    from fcvm.vmm.firecracker.binary import find_firecracker
    from fcvm.vmm.firecracker.jail import cgroup2_mount, find_jailer

    firecracker = find_firecracker(None)
    if firecracker is None:
        return Check(
            "jailer", CheckStatus.MISSING, "no firecracker binary (needed for --jailer)", "fcvm setup firecracker"
        )
    try:
        jailer = find_jailer(None, firecracker)
    except FcvmError as exc:
        return Check(
            "jailer", CheckStatus.MISSING, f"{exc} (needed for --jailer)", exc.hint or "fcvm setup firecracker"
        )
    mount = cgroup2_mount()
    if mount is None:
        return Check(
            "jailer",
            CheckStatus.WARN,
            f"{jailer}, but no cgroup v2 hierarchy is mounted",
            "mount -t cgroup2 none /sys/fs/cgroup/unified",
        )
    return Check("jailer", CheckStatus.OK, f"{jailer} (for --jailer; cgroup v2 at {mount})")


def _qemu() -> Check:
    binary = host.which("qemu-system-x86_64")
    if binary is None:
        return Check("qemu", CheckStatus.MISSING, "qemu-system-x86_64 not found", "apt-get install qemu-system-x86")
    return Check("qemu", CheckStatus.OK, _version([binary, "--version"]))


def _podman() -> list[Check]:
    """Host podman exports local images for the guest (essential); whether it can also run containers here is
    reported, but fcvm never runs containers on the host."""
    binary = host.which("podman")
    if binary is None:
        return [
            Check(
                "podman",
                CheckStatus.MISSING,
                "podman not found (needed to export local images)",
                "apt-get install podman",
                essential=True,
            )
        ]
    result = proc.run([binary, "info", "--format", "{{.Host.OCIRuntime.Name}}"], check=False, timeout=60)
    runtime = result.stdout.decode().strip()
    version = _version([binary, "--version"])
    if result.returncode != 0 or not runtime:
        return [
            Check(
                "podman",
                CheckStatus.MISSING,
                f"{version}; `podman info` failed",
                "check podman's configuration",
                essential=True,
            )
        ]
    podman = Check("podman", CheckStatus.OK, f"{version} (exports local images)", essential=True)
    if proc.run([binary, "image", "exists", "localhost/fcvm-busybox"], check=False, timeout=30).returncode != 0:
        return [
            podman,
            Check(
                "host runtime", CheckStatus.WARN, f"{runtime}: not tried (no local test image)", "fcvm setup demo-image"
            ),
        ]
    probe = proc.run(
        [binary, "run", "--rm", "--network", "none", "--runtime", runtime, "localhost/fcvm-busybox", "true"],
        check=False,
        timeout=120,
    )
    if probe.returncode == 0:
        return [podman, Check("host runtime", CheckStatus.OK, f"{runtime} runs containers on the host")]
    error = (probe.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
    return [
        podman,
        Check(
            "host runtime",
            CheckStatus.WARN,
            f"{runtime} cannot run containers on the host: {error}",
            "not needed by fcvm (containers run in the guest, whose podman uses crun)",
        ),
    ]


def _storage() -> Check:
    from fcvm.storage.btrfs import filesystem_type, reflink_works

    data = paths.data_dir()
    fstype = filesystem_type(data)
    try:
        works = reflink_works(data)
    except OSError as exc:
        return Check("storage", CheckStatus.MISSING, f"{data}: {exc.strerror}", "check permissions on the data dir")
    if works:
        return Check("storage", CheckStatus.OK, f"{data} on {fstype}, reflinks work")
    return Check(
        "storage", CheckStatus.WARN, f"{data} on {fstype}, no reflinks: disks are full copies", "fcvm setup storage"
    )


def _device(name: str, path: str, fix: str, essential: bool = False) -> Check:
    ok, detail = host.device_usable(path)
    return Check(name, CheckStatus.OK if ok else CheckStatus.MISSING, detail, "" if ok else fix, essential)


def _tool(name: str, candidates: tuple[str, ...], fix: str, essential: bool = False) -> Check:
    found = host.which(*candidates)
    if found:
        return Check(name, CheckStatus.OK, found)
    return Check(name, CheckStatus.MISSING, f"none of {', '.join(candidates)} found", fix, essential)


def _assets() -> list[Check]:
    from fcvm.guest import find_kernel, find_rootfs

    kernel = find_kernel()
    rootfs = find_rootfs()
    return [
        Check(
            "guest kernel",
            CheckStatus.OK if kernel else CheckStatus.MISSING,
            f"{kernel.version}: {kernel.bzimage.parent}" if kernel else "not built",
            "" if kernel else "fcvm setup kernel",
            essential=True,
        ),
        Check(
            "guest rootfs",
            CheckStatus.OK if rootfs else CheckStatus.MISSING,
            str(rootfs) if rootfs else "not built",
            "" if rootfs else "fcvm setup rootfs",
            essential=True,
        ),
    ]


def _vmm_privileges() -> Check:
    """What a VMM escape would give the guest: a uid of its own, or root."""
    from fcvm.vmm.firecracker.binary import find_firecracker

    tun = Path("/dev/net/tun")
    return _vmm_verdict(root=os.geteuid() == 0, setpriv=host.which("setpriv") is not None,
                        tun_mode=tun.stat().st_mode if tun.exists() else None,
                        firecracker=find_firecracker(None) is not None)


def _vmm_verdict(*, root: bool, setpriv: bool, tun_mode: int | None, firecracker: bool) -> Check:
    name = "vmm privileges"
    if not root:
        return Check(name, CheckStatus.OK, "VMMs run as this user, in a user namespace")
    if not setpriv:
        return Check(name, CheckStatus.MISSING, "no setpriv: bridged QEMU cannot leave root",
                     "apt-get install util-linux")
    if tun_mode is not None and tun_mode & 0o006 != 0o006:
        return Check(name, CheckStatus.MISSING, "/dev/net/tun is root's alone: bridged QEMU, a uid of its own, cannot "
                     "open its TAP", "chmod 0666 /dev/net/tun (what udev sets)")
    qemu = "bridged QEMU runs as a uid of its own, sandboxed"
    if firecracker:
        return Check(name, CheckStatus.WARN, f"{qemu}; Firecracker without --jailer runs as root, unsandboxed: "
                     "a VMM escape there is a host-root escape", "run Firecracker VMs with --jailer")
    return Check(name, CheckStatus.OK, qemu)


def _hypervisor(found: dict[str, Check]) -> Check:
    """A VM needs some hypervisor that can really boot a guest here (fc-mock boots through QEMU)."""
    kvm = found["kvm"].status == CheckStatus.OK
    firecracker = found["firecracker"]
    if firecracker.status == CheckStatus.OK and (kvm or "fc-mock" in firecracker.detail):
        return Check("hypervisor", CheckStatus.OK, firecracker.detail, essential=True)
    if found["qemu"].status == CheckStatus.OK:
        return Check("hypervisor", CheckStatus.OK, f"qemu ({'kvm' if kvm else 'tcg'})", essential=True)
    return Check(
        "hypervisor", CheckStatus.MISSING, "none can boot a guest", "apt-get install qemu-system-x86", essential=True
    )


def checks() -> list[Check]:
    results = [
        _kvm(),
        _firecracker(),
        _jailer(),
        _qemu(),
        _vmm_privileges(),
        *_podman(),
        _storage(),
        _device("userfaultfd", "/dev/userfaultfd", "modprobe userfaultfd; needs root or vm.unprivileged_userfaultfd"),
        _device("fuse", "/dev/fuse", "modprobe fuse", essential=True),
        _device("tun", "/dev/net/tun", "modprobe tun", essential=True),
        _tool("iptables", ("iptables",), "apt-get install iptables (bridged networking)"),
        _tool("slirp4netns", ("slirp4netns",), "apt-get install slirp4netns (rootless networking)"),
        *_assets(),
    ]
    results.append(_hypervisor({c.name: c for c in results}))
    return results


def run(args: argparse.Namespace) -> int:
    results = checks()
    ready = all(c.status == CheckStatus.OK for c in results if c.essential)
    if args.json:
        print(json.dumps({"ready": ready, "checks": [asdict(c) for c in results]}, indent=2))
        return 0 if ready else 1
    from rich.console import Console
    from rich.table import Table

    styles = {CheckStatus.OK: "green", CheckStatus.WARN: "yellow", CheckStatus.MISSING: "red"}
    table = Table(title=f"fcvm doctor ({'root' if os.geteuid() == 0 else 'user'}; data dir {paths.data_dir()})")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in results:
        style = styles[check.status]
        table.add_row(check.name, f"[{style}]{check.status}[/{style}]", check.detail, check.fix)
    console = Console(file=sys.stdout)
    console.print(table)
    console.print("ready to run VMs" if ready else "not ready: fix the essential checks above")
    return 0 if ready else 1
