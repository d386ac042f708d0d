"""The initramfs: busybox, the guest's kernel modules, the agent packages, and an `/init` that loads
the modules, mounts /dev/vda and switches root into `python3 -m fc_agent`.

The agent ships here (not in the rootfs) so that changing it rebuilds only this small archive.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import py_compile
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fcvm.core.errors import FcvmError
from fcvm.guest import cpio
from fcvm.guest.assets import digest
from fcvm.guest.modules import NETFILTER_MODULES, REQUIRED_MODULES, ModuleIndex, read_module

FORMAT = "initramfs-v1"
AGENT_PACKAGES = ("fc_agent", "fcvm_wire")
AGENT_DIR = "/opt/fc-agent"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Guest python is Debian bookworm's 3.11: precompiled bytecode is shipped only when the host matches.
GUEST_PYTHON = (3, 11)
_APPLETS = (
    "sh", "mount", "umount", "insmod", "switch_root", "poweroff", "sleep", "echo", "cat", "mkdir",
    "rm", "cp", "ls", "sync", "dmesg",
)  # fmt: skip

# The boot contract with the agent. {modules} is replaced by the generated `load` lines.
INIT_TEMPLATE = r"""#!/bin/sh
# fcvm initramfs /init (generated; see fcvm/guest/initramfs.py)
export PATH=/bin
set -f

fail() {
    echo "fcvm-init: $*"
    poweroff -f
    sleep 10
    exit 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
read -r CMDLINE < /proc/cmdline

# load NAME DASHED-NAME REQUIRED: insmod /lib/modules/NAME.ko with any NAME.param=value options from
# the kernel command line (Firecracker passes virtio_mmio.device=... there; only modprobe would
# apply those by itself).
LOADED=""
load() {
    opts=""
    for word in $CMDLINE; do
        case "$word" in
            "$1".*=*) opts="$opts ${word#"$1".}" ;;
            "$2".*=*) opts="$opts ${word#"$2".}" ;;
        esac
    done
    # shellcheck disable=SC2086
    if insmod "/lib/modules/$1.ko" $opts; then
        LOADED="$LOADED $1"
    elif [ "$3" = 1 ]; then
        fail "cannot load kernel module $1"
    else
        echo "fcvm-init: warning: cannot load kernel module $1"
    fi
}

{modules}
echo "fcvm-init: loaded modules:$LOADED"

n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ "$n" -gt 100 ] && fail "no root disk: /dev/vda did not appear within 10 s"
    sleep 0.1
done
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda (ext4) on /newroot"
rm -rf /newroot{agent_dir} && mkdir -p /newroot{agent_dir} && cp -a /fc-agent/. /newroot{agent_dir}/ \
    || fail "cannot install the agent in {agent_dir}"
[ -x /newroot/usr/bin/python3 ] || fail "the root filesystem has no /usr/bin/python3"
mount --move /dev /newroot/dev || fail "cannot move /dev into the new root"
umount /sys /proc

export PATH={guest_path}
export PYTHONPATH={agent_dir}
if [ -n "$fcvm_init" ]; then
    # Debugging hook (like the kernel's init=): a shell command instead of the agent, with the
    # basic mounts the agent would have made.
    exec switch_root /newroot /bin/sh -c 'mount -t proc proc /proc; mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
eval "$fcvm_init"'
fi
exec switch_root /newroot /usr/bin/python3 -m fc_agent
"""


def _agent_roots() -> list[tuple[str, Path]]:
    roots = []
    for package in AGENT_PACKAGES:
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise FcvmError(f"the guest agent package {package} is not importable on the host")
        roots.append((package, Path(locations[0])))
    return roots


def agent_sources() -> list[tuple[str, bytes]]:
    """(path inside the agent dir, content) of every *.py of the agent packages, sorted."""
    files: list[tuple[str, bytes]] = []
    for package, root in _agent_roots():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            files.append((f"{package}/{path.relative_to(root).as_posix()}", path.read_bytes()))
    return files


def _precompile() -> bool:
    return sys.version_info[:2] == GUEST_PYTHON


def initramfs_name(kernel_id: str, sources: list[tuple[str, bytes]] | None = None) -> str:
    """`initramfs-<hash>.cpio.gz`: the kernel (its modules and busybox), the init script, the module
    lists and the agent sources name it."""
    sources = agent_sources() if sources is None else sources
    parts: list[str | bytes] = [
        FORMAT,
        kernel_id,
        INIT_TEMPLATE,
        " ".join(REQUIRED_MODULES),
        " ".join(NETFILTER_MODULES),
        f"pyc={_precompile()}",
    ]
    for rel, data in sources:
        parts += [rel, data]
    return f"initramfs-{digest(parts)}.cpio.gz"


@dataclass(frozen=True)
class ModulePlan:
    order: list[str]  # load order
    required: set[str]  # failures of these are fatal at boot
    paths: dict[str, str]  # name -> path relative to lib/modules/<version>


def plan_modules(moddir: Path) -> ModulePlan:
    index = ModuleIndex.load(moddir)
    required = set(index.resolve(REQUIRED_MODULES))
    order = index.resolve(REQUIRED_MODULES, NETFILTER_MODULES)
    return ModulePlan(order=order, required=required, paths={n: index.paths[n] for n in order})


def render_init(plan: ModulePlan) -> str:
    lines = [
        f"load {name} {name.replace('_', '-')} {1 if name in plan.required else 0}" for name in plan.order
    ]
    return (
        INIT_TEMPLATE.replace("{modules}", "\n".join(lines))
        .replace("{agent_dir}", AGENT_DIR)
        .replace("{guest_path}", shlex.quote(GUEST_PATH))
    )


def _compiled(rel: str, data: bytes) -> bytes | None:
    """CHECKED_HASH bytecode for one agent module, so the guest never compiles at boot."""
    with tempfile.TemporaryDirectory(prefix="fcvm-pyc-") as tmp:
        src = Path(tmp) / "src.py"
        src.write_bytes(data)
        out = Path(tmp) / "out.pyc"
        try:
            py_compile.compile(
                str(src),
                cfile=str(out),
                dfile=f"{AGENT_DIR}/{rel}",
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
            )
        except py_compile.PyCompileError:
            return None  # the guest will report the syntax error itself
        return out.read_bytes()


def build_initramfs(moddir: Path, busybox: Path, out: Path, sources: list[tuple[str, bytes]]) -> ModulePlan:
    """Write the gzipped cpio to `out` (the caller publishes it atomically)."""
    plan = plan_modules(moddir)
    entries: list[cpio.Entry] = [
        cpio.directory(d) for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", "fc-agent")
    ]
    entries.append(cpio.char_device("dev/console", 5, 1))
    entries.append(cpio.char_device("dev/null", 1, 3, 0o666))
    entries.append(cpio.file("bin/busybox", busybox.read_bytes(), 0o755))
    entries += [cpio.symlink(f"bin/{applet}", "busybox") for applet in _APPLETS]
    entries.append(cpio.file("init", render_init(plan).encode(), 0o755))
    for name in plan.order:
        entries.append(cpio.file(f"lib/modules/{name}.ko", read_module(moddir / plan.paths[name])))
    made: set[str] = set()
    tag = sys.implementation.cache_tag
    for rel, data in sources:
        parent = os.path.dirname(rel)
        for i, _ in enumerate(parent.split("/")):
            d = "/".join(parent.split("/")[: i + 1])
            if d not in made:
                made.add(d)
                entries.append(cpio.directory(f"fc-agent/{d}"))
        entries.append(cpio.file(f"fc-agent/{rel}", data))
        if _precompile() and tag:
            pyc = _compiled(rel, data)
            if pyc is not None:
                cache = f"{parent}/__pycache__"
                if cache not in made:
                    made.add(cache)
                    entries.append(cpio.directory(f"fc-agent/{cache}"))
                stem = os.path.basename(rel)[:-3]
                entries.append(cpio.file(f"fc-agent/{cache}/{stem}.{tag}.pyc", pyc))
    with out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(cpio.archive(entries))
    return plan
