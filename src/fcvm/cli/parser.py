"""The argparse CLI: every command, its help and its errors. The read commands come from cli/read_commands.py,
which parses their plain argv without argparse."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fcvm import __version__
from fcvm.cli.read_commands import READ_COMMANDS
from fcvm.core.kinds import HYPERVISOR_CHOICES, NetworkMode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn  # typing costs every command about 3 ms at start


class _Parser(argparse.ArgumentParser):
    """Bad arguments are a one-line error naming the problem, like every other fcvm error."""

    def error(self, message: str) -> NoReturn:
        print(f"Error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _command(sub: argparse._SubParsersAction, name: str, help_text: str, handler: str) -> argparse.ArgumentParser:
    """A command's parser; `handler` is "module:function" in fcvm.commands."""
    parser = sub.add_parser(name, help=help_text)
    parser.set_defaults(handler=handler)
    return parser


def _group(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=None, group_parser=parser)
    return parser.add_subparsers(title="commands", metavar="COMMAND")


def _add_instance_options(parser: argparse.ArgumentParser, *, what: str, boot_timeout: float) -> None:
    """What a new VM and a clone share: name, ports, network, and how the command runs."""
    parser.add_argument("--name", help=f"{what} name (default: generated)")
    parser.add_argument(
        "-p", "--publish", action="append", default=[], metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/udp]",
        help="publish a guest port on the host",
    )
    parser.add_argument("--network", default=None, choices=list(NetworkMode),
                        help="bridged (root's default) or rootless (everyone else's)")
    parser.add_argument("--allow-host-loopback", action="store_true",
                        help="let the VM reach the host's 127.0.0.1 at its gateway address, like podman's"
                        " slirp4netns:allow_host_loopback=true (by default a VM reaches no host service)")
    parser.add_argument("--firecracker-bin", help="firecracker binary (also FCVM_FIRECRACKER_BIN)")
    parser.add_argument("-d", "--detach", action="store_true", help="run in the background")
    parser.add_argument("--rm", action="store_true", help=f"remove the {what}'s record when it exits")
    parser.add_argument("--boot-timeout", type=float, default=boot_timeout, metavar="SECONDS",
                        help=f"fail if it is not running this long after start (default {boot_timeout:.0f})")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_instance_options(parser, what="VM", boot_timeout=300.0)
    parser.add_argument("--cpu", type=int, default=2, help="vCPUs (default 2)")
    parser.add_argument("--mem", type=int, default=1024, help="memory in MiB (default 1024)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="environment variable")
    parser.add_argument(
        "--map", action="append", default=[], metavar="HOSTDIR:GUESTDIR[:ro]",
        help="share a host directory into the container over fuse-pipe",
    )
    parser.add_argument("--health-check", metavar="URL", help="HTTP URL polled through the VM's network")
    parser.add_argument("--hypervisor", default="auto", choices=HYPERVISOR_CHOICES,
                        help="firecracker, qemu or auto (default: firecracker where KVM can boot it)")
    parser.add_argument("--jailer", action="store_true",
                        help="run firecracker under its jailer: chroot, own uid and cgroup (root, bridged)")
    parser.add_argument("--jailer-bin", help="jailer binary (also FCVM_JAILER_BIN; default: beside firecracker)")
    parser.add_argument("--kernel", help="guest kernel to use instead of the built one")
    parser.add_argument("--initrd", help="initramfs to use instead of the built one")
    parser.add_argument("--user", "-u", help="user in the container")
    parser.add_argument("--workdir", "-w", help="working directory in the container")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="boot cold: neither start from the snapshot cache nor add to it (also FCVM_NO_SNAPSHOT=1)")


def _podman(sub: argparse._SubParsersAction) -> None:
    podman = _group(sub, "podman", "run containers in microVMs, podman style")
    run = _command(podman, "run", "run a container in a new microVM", "podman_run:run")
    _add_run_options(run)
    run.add_argument("image", help="image, e.g. localhost/web or docker.io/library/nginx:alpine")
    run.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments for the container")


def _exec(sub: argparse._SubParsersAction) -> None:
    exec_ = _command(sub, "exec", "run a command in a VM's container (or the VM with --vm)", "exec_:run")
    exec_.add_argument("name")
    exec_.add_argument("--vm", action="store_true", help="run in the VM, not the container")
    exec_.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    exec_.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    exec_.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")


def _stop(sub: argparse._SubParsersAction) -> None:
    stop = _command(sub, "stop", "stop VMs", "stop:run")
    stop.add_argument("names", nargs="+", metavar="NAME")
    stop.add_argument("-t", "--time", type=float, default=10.0, help="seconds to wait before killing")


def _rm(sub: argparse._SubParsersAction) -> None:
    rm = _command(sub, "rm", "remove exited VMs (running ones too with -f)", "rm:run")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("-f", "--force", action="store_true", help="stop running VMs first")


def _snapshot(sub: argparse._SubParsersAction) -> None:
    snapshot = _group(sub, "snapshot", "snapshot running VMs and start clones of them")
    snap_create = _command(snapshot, "create", "snapshot a running VM (pause, save, resume)", "snapshot_create:run")
    snap_create.add_argument("name", nargs="?", help="VM to snapshot")
    snap_create.add_argument("--pid", type=int, help="the VM's fcvm process instead of its name (what $! gives)")
    snap_create.add_argument("--tag", help="snapshot name (default: the VM's name)")
    snap_serve = _command(snapshot, "serve", "serve a snapshot's memory over userfaultfd", "snapshot_serve:run")
    snap_serve.add_argument("snapshot", nargs="?", help="snapshot name")
    snap_serve.add_argument("--mem-file", help="memory file to serve (low-level form)")
    snap_serve.add_argument("--socket", help="Unix socket to listen on (low-level form)")
    snap_serve.add_argument("--prefetch", choices=["on", "off"], default="on", help="working-set prefetch")
    snap_serve.add_argument(
        "--fault-around", default="64K", metavar="SIZE", help="bytes copied around each fault (e.g. 64K)"
    )
    snap_serve.add_argument("--metrics-json", metavar="PATH", help="write per-client metrics here on exit")
    snap_run = _command(snapshot, "run", "start a clone of a snapshot", "snapshot_run:run")
    snap_run.add_argument("--snapshot", help="snapshot to clone; memory mapped from its file")
    snap_run.add_argument("--pid", type=int, help="`fcvm snapshot serve` process to take memory from (UFFD)")
    _add_instance_options(snap_run, what="clone", boot_timeout=120.0)
    snap_run.add_argument("--exec", metavar="CMD", help="run CMD in the clone's container, print, clean up")
    snap_ls = _command(snapshot, "ls", "list snapshots and their memory servers", "snapshot_ls:run")
    snap_ls.add_argument("--json", action="store_true")
    snap_prune = _command(snapshot, "prune", "remove snapshot cache entries beyond the size limit",
                          "snapshot_prune:run")
    snap_prune.add_argument("--all", action="store_true", help="every cache entry not in use")
    snap_rm = _command(snapshot, "rm", "remove snapshots (in use: only with -f, which stops their users)",
                       "snapshot_rm:run")
    snap_rm.add_argument("names", nargs="+", metavar="TAG")
    snap_rm.add_argument("-f", "--force", action="store_true", help="stop the servers and clones using it first")


def _setup(sub: argparse._SubParsersAction) -> None:
    setup = _group(sub, "setup", "prepare the host: storage, guest kernel, rootfs, firecracker")
    setup_storage = _command(setup, "storage", "make the data directory btrfs (loopback if needed)",
                             "setup_storage:run")
    setup_storage.add_argument("--size", default="20G", help="size of the loopback image (default 20G)")
    setup_kernel = _command(setup, "kernel", "build the guest kernel, vmlinux and initramfs", "setup_kernel:run")
    setup_kernel.add_argument("--kernel-deb", help="use this linux-image .deb instead of downloading")
    _command(setup, "rootfs", "build the guest root filesystem image", "setup_rootfs:run")
    _command(setup, "uffd-preload", "build the QEMU library for UFFD snapshot restores", "setup_uffd:run")
    _command(setup, "demo-image", "build the local demo images (busybox, httpd)", "setup_demo_image:run")
    setup_fc = _command(setup, "firecracker", "install a Firecracker release", "setup_firecracker:run")
    setup_fc.add_argument("--tarball", help="local firecracker-vX.Y.Z-x86_64.tgz (with SHA256SUMS beside it)")
    setup_fc.add_argument("--version", dest="fc_version", help="release to download")


def _doctor(sub: argparse._SubParsersAction) -> None:
    doctor = _command(sub, "doctor", "check what this host can do, and how to fix what it cannot", "doctor:run")
    doctor.add_argument("--json", action="store_true", help="print JSON")


def _gc(sub: argparse._SubParsersAction) -> None:
    _command(sub, "gc", "remove what crashed fcvm processes left behind", "gc:run")


def _serve(sub: argparse._SubParsersAction) -> None:
    serve = _command(sub, "serve", "a sandbox API the official E2B SDKs drive (templates: snapshots, images)",
                     "serve:run")
    serve.add_argument("--listen", default="127.0.0.1:3000", metavar="HOST:PORT", help="default 127.0.0.1:3000")
    serve.add_argument("--default-template", default="localhost/fcvm-busybox", metavar="TEMPLATE",
                       help="what the SDK's default template `base` starts: a snapshot or an image")
    serve.add_argument("--boot-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="fail a sandbox that is not running this long after start (default 300)")
    serve.add_argument("--pool", type=int, default=0, metavar="N",
                       help="keep N machines of each template in use started ahead, so creates only take one")


def _fuse_pipe(sub: argparse._SubParsersAction) -> None:
    fuse = _group(sub, "fuse-pipe", "host directories over one byte stream (FUSE over vsock)")
    fuse_serve = _command(fuse, "serve", "serve DIR on a Unix socket", "fuse_pipe:serve")
    fuse_serve.add_argument("dir")
    fuse_serve.add_argument("--socket", required=True)
    fuse_serve.add_argument("--ro", action="store_true", help="read-only")
    fuse_mount = _command(fuse, "mount", "mount a served directory", "fuse_pipe:mount")
    fuse_mount.add_argument("mountpoint")
    fuse_mount.add_argument("--socket", help="Unix socket of the server")
    fuse_mount.add_argument("--vsock-port", type=int, help="AF_VSOCK port on CID 2 (inside a guest)")
    fuse_mount.add_argument("--readers", type=int, default=1, help="/dev/fuse reader threads")
    fuse_local = _command(fuse, "mount-local", "serve DIR and mount it at MOUNTPOINT in one process",
                          "fuse_pipe:mount_local")
    fuse_local.add_argument("dir")
    fuse_local.add_argument("mountpoint")
    fuse_local.add_argument("--ro", action="store_true")
    fuse_local.add_argument("--readers", type=int, default=1)


_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "podman": _podman,
    **{name: command.add_to for name, command in READ_COMMANDS.items()},
    "exec": _exec,
    "stop": _stop,
    "rm": _rm,
    "snapshot": _snapshot,
    "setup": _setup,
    "doctor": _doctor,
    "gc": _gc,
    "serve": _serve,
    "fuse-pipe": _fuse_pipe,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or with `command` only that one under `fcvm`: building the other parsers would cost `fcvm ls`
    about 5 ms, a fifth of its start."""
    parser = _Parser(
        prog="fcvm", description="Run Podman containers inside lightweight microVMs."
    )
    parser.add_argument("--version", action="version", version=f"fcvm {__version__}")
    parser.add_argument("--log-level", help="debug, info, warning or error (also FCVM_LOG)")
    parser.set_defaults(handler=None, group_parser=parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, add in _COMMANDS.items():
        if command in (None, name):
            add(sub)
    return parser


_EXEC_FLAGS = {"--vm": ("vm",), "-i": ("interactive",), "--interactive": ("interactive",), "-t": ("tty",),
               "--tty": ("tty",), "-it": ("interactive", "tty"), "-ti": ("interactive", "tty")}


def _exec_options_after_name(args: argparse.Namespace) -> None:
    """`fcvm exec NAME --vm -it -- CMD`: flags may also sit between the name and `--`."""
    command = list(args.command)
    while command and command[0] in _EXEC_FLAGS:
        for flag in _EXEC_FLAGS[command.pop(0)]:
            setattr(args, flag, True)
    if command[:1] == ["--"]:
        command.pop(0)
    args.command = command


def parse(words: Sequence[str]) -> argparse.Namespace:
    """`fcvm WORDS...` parsed; bad arguments exit with a one-line error."""
    # Only when the command comes first: `fcvm --help ls` and `fcvm --log-level debug ls` need the top level whole.
    args = build_parser(words[0] if words[:1] and words[0] in _COMMANDS else None).parse_args(words)
    if getattr(args, "handler", None) == "exec_:run":
        _exec_options_after_name(args)
    return args


def usage_error(message: str) -> NoReturn:
    """Exit 2 with the one-line error a bad argument gets."""
    _Parser(prog="fcvm").error(message)
