"""Kernel module dependency resolution from `modules.dep` (as written by `depmod -b`).

modprobe's rule: a module's line lists every module it needs; load those first. We resolve a wanted
list into one load order (dependencies before dependents, each module once) so that the initramfs can
use plain `insmod` on the .ko files, with no modprobe or modules.dep at boot.
"""

from __future__ import annotations

import gzip
import lzma
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fcvm.core import proc
from fcvm.core.errors import FcvmError

_SUFFIX = re.compile(r"\.ko(\.(xz|gz|zst))?$")

# What the guest needs, in a sensible order (dependencies are added as modules.dep says).
# Required: the VM cannot boot or talk to the host without these.
REQUIRED_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
    "fuse",
    "overlay",
)
# Optional: container networking (bridge + veth + nftables/iptables NAT as podman's network
# backends use them). A kernel that lacks one (or has it built in) still boots.
NETFILTER_MODULES: tuple[str, ...] = (
    "bridge",
    "br_netfilter",
    "veth",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "nf_nat",
    "nf_conntrack",
    "x_tables",
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "xt_MASQUERADE",
    "xt_conntrack",
    "xt_addrtype",
    "xt_comment",
    "xt_mark",
    "xt_nat",
    "xt_tcpudp",
)


class ModuleError(FcvmError):
    pass


def module_name(path: str) -> str:
    """`kernel/net/ipv4/netfilter/iptable_nat.ko.xz` -> `iptable_nat` (dashes count as underscores)."""
    base = path.rsplit("/", 1)[-1]
    return _SUFFIX.sub("", base).replace("-", "_")


@dataclass
class ModuleIndex:
    """What modules.dep (and modules.builtin) say about one kernel's modules."""

    paths: dict[str, str] = field(default_factory=dict)  # name -> path relative to lib/modules/<ver>
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> names it needs
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, modules_dep: str, modules_builtin: str = "") -> ModuleIndex:
        index = cls()
        for lineno, raw in enumerate(modules_dep.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            target, sep, rest = line.partition(":")
            if not sep:
                raise ModuleError(f"modules.dep line {lineno} has no ':': {raw!r}")
            name = module_name(target.strip())
            index.paths[name] = target.strip()
            index.deps[name] = [module_name(dep) for dep in rest.split()]
        for raw in modules_builtin.splitlines():
            if raw.strip():
                index.builtin.add(module_name(raw.strip()))
        return index

    @classmethod
    def load(cls, moddir: Path) -> ModuleIndex:
        dep = moddir / "modules.dep"
        if not dep.exists():
            raise ModuleError(f"{dep} is missing (run depmod -b on the extracted kernel)")
        builtin = moddir / "modules.builtin"
        return cls.parse(dep.read_text(), builtin.read_text() if builtin.exists() else "")

    def resolve(self, required: Sequence[str], optional: Iterable[str] = ()) -> list[str]:
        """Load order for `required` plus whichever of `optional` this kernel has as modules.
        Built-in modules are dropped; a required module that is neither built in nor a module is an
        error (the guest would not boot)."""
        order: list[str] = []
        state: dict[str, str] = {}  # name -> "visiting" | "done"

        def visit(name: str, chain: tuple[str, ...]) -> None:
            mark = state.get(name)
            if mark == "done":
                return
            if mark == "visiting":
                raise ModuleError("module dependency cycle: " + " -> ".join((*chain, name)))
            if name not in self.paths:
                if name in self.builtin:
                    state[name] = "done"
                    return
                needed_by = f" (needed by {chain[-1]})" if chain else ""
                raise ModuleError(f"kernel module {name} is not in this kernel{needed_by}")
            state[name] = "visiting"
            # modules.dep lists the deepest dependency last; visiting in reverse loads it first.
            for dep in reversed(self.deps.get(name, [])):
                visit(dep, (*chain, name))
            state[name] = "done"
            order.append(name)

        for name in required:
            visit(module_name(name), ())
        for name in optional:
            canonical = module_name(name)
            if canonical in self.paths:
                visit(canonical, ())
        return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes; compressed modules (.ko.xz, .ko.gz, .ko.zst) are decompressed, because
    busybox insmod loads only plain .ko files."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        return proc.run(["zstd", "-d", "-c", "-q", path], timeout=60).stdout
    raise ModuleError(f"unknown kernel module format: {path}")
