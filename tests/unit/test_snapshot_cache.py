"""The snapshot cache's keys: what a warm start may restore, and what it never may."""

from __future__ import annotations

import dataclasses

from fcvm.snapshot.cache import CacheLevel, RunShape

BASE = RunShape(image_id="sha256:aa", hypervisor="qemu", vcpus=2, mem_mib=1024,
                assets=("kernel-1/bzImage", "initramfs-1.cpio.gz", "rootfs-1.ext4"), cmd=("httpd",),
                env=(("A", "1"),), user="", workdir="", name="web", volumes=(("/www", False),))


def test_a_changed_asset_changes_both_keys() -> None:
    for index in range(3):
        assets = list(BASE.assets)
        assets[index] += "-changed"
        other = dataclasses.replace(BASE, assets=tuple(assets))
        for level in CacheLevel:
            assert other.key(level) != BASE.key(level), (index, level)


def test_what_the_container_sees_changes_only_the_startup_key() -> None:
    for change in ({"cmd": ("sh",)}, {"env": (("A", "2"),)}, {"user": "1000"}, {"workdir": "/srv"},
                   {"name": "other"}, {"volumes": (("/www", True),)}):
        other = dataclasses.replace(BASE, **change)  # type: ignore[arg-type]
        assert other.key(CacheLevel.STARTUP) != BASE.key(CacheLevel.STARTUP), change
        assert other.key(CacheLevel.PRESTART) == BASE.key(CacheLevel.PRESTART), change


def test_the_machine_and_image_change_both_keys() -> None:
    for change in ({"image_id": "sha256:bb"}, {"vcpus": 1}, {"mem_mib": 512}, {"hypervisor": "firecracker"}):
        other = dataclasses.replace(BASE, **change)  # type: ignore[arg-type]
        for level in CacheLevel:
            assert other.key(level) != BASE.key(level), (change, level)
