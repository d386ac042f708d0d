from __future__ import annotations

from pathlib import Path

from fcvm.storage.btrfs import clone_file, filesystem_type, reflink_works


def test_without_reflinks_a_disk_copy_keeps_its_holes(tmp_path: Path) -> None:
    src = tmp_path / "base.ext4"
    with open(src, "wb") as image:
        image.write(b"superblock" * 1000)
        image.truncate(512 << 20)  # 512 MiB, almost all hole
    dst = tmp_path / "vm.ext4"
    reflinked = clone_file(src, dst)
    assert reflinked == reflink_works(tmp_path), filesystem_type(tmp_path)
    assert dst.stat().st_size == src.stat().st_size
    assert dst.stat().st_blocks * 512 < 16 << 20, "the copy filled in the holes"
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)
