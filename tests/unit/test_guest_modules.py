"""Kernel module dependency resolution from a fake modules.dep."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from fcvm.guest.modules import ModuleError, ModuleIndex, module_name, read_module

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/netfilter/nf_nat.ko.xz: kernel/net/netfilter/nf_conntrack.ko.xz kernel/lib/libcrc32c.ko
kernel/net/netfilter/nf_conntrack.ko.xz: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/fs/fuse/fuse.ko:
kernel/net/sched/sch-fq.ko:
"""
BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n"


def index() -> ModuleIndex:
    # modules.dep has no line continuations; join the one above that was wrapped for width.
    return ModuleIndex.parse(MODULES_DEP.replace("\\\n", ""), BUILTIN)


def test_names_drop_directories_suffixes_and_dashes() -> None:
    assert module_name("kernel/net/netfilter/nf_nat.ko.xz") == "nf_nat"
    assert module_name("sch-fq.ko.zst") == "sch_fq"
    assert module_name("virtio-blk") == "virtio_blk"


def test_dependencies_come_first_and_once() -> None:
    order = index().resolve(["virtio_mmio", "virtio_blk", "virtio_net"])
    assert order == ["virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net"]
    for name, deps in index().deps.items():
        if name in order:
            assert all(order.index(dep) < order.index(name) for dep in deps)


def test_builtin_is_skipped_and_optional_missing_is_ignored() -> None:
    order = index().resolve(["ext4", "fuse"], optional=["nf_nat", "xt_does_not_exist", "sch-fq"])
    assert order == ["fuse", "libcrc32c", "nf_conntrack", "nf_nat", "sch_fq"]
    assert index().paths["nf_nat"] == "kernel/net/netfilter/nf_nat.ko.xz"


def test_missing_required_module_is_an_error() -> None:
    with pytest.raises(ModuleError, match="vsock is not in this kernel"):
        index().resolve(["fuse", "vsock"])
    broken = ModuleIndex.parse("kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(ModuleError, match=r"b is not in this kernel \(needed by a\)"):
        broken.resolve(["a"])


def test_cycle_is_an_error() -> None:
    cyclic = ModuleIndex.parse("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(ModuleError, match="cycle"):
        cyclic.resolve(["a"])


def test_load_reads_depmod_output_and_compressed_modules_decompress(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="depmod"):
        ModuleIndex.load(tmp_path)
    (tmp_path / "modules.dep").write_text(MODULES_DEP.replace("\\\n", ""))
    assert "virtio_net" in ModuleIndex.load(tmp_path).paths
    packed = tmp_path / "m.ko.xz"
    packed.write_bytes(lzma.compress(b"\x7fELF module"))
    assert read_module(packed) == b"\x7fELF module"
