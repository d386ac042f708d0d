"""Content addressing of the guest assets: same inputs -> same names; an agent change -> a new
initramfs only; a failed build leaves nothing that looks finished. Uses a fake kernel .deb."""

from __future__ import annotations

import errno
import gzip
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import lz4.block
import pytest

from fcvm.core import paths
from fcvm.guest import assets, debs, initramfs, kernel, rootfs
from fcvm.guest.modules import REQUIRED_MODULES
from tests.support import require_tool

VERSION = "9.9.9-fcvm-test"


@pytest.fixture(autouse=True)
def private_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake kernels must never land in the shared assets dir (FCVM_ASSETS_DIR) the other tests use."""
    where = tmp_path / "private" / "assets"
    monkeypatch.setenv(paths.ASSETS_DIR_ENV, str(where))
    return where


def _fake_bzimage() -> bytes:
    elf = bytearray(b"\x7fELF" + bytes(60) + b"kernel text " * 5000)
    elf[4], elf[5] = 2, 1
    struct.pack_into("<HH", elf, 16, 2, 62)
    struct.pack_into("<Q", elf, 24, 0x1000000)
    block = lz4.block.compress(bytes(elf), store_size=False)
    payload = b"\x02\x21\x4c\x18" + struct.pack("<I", len(block)) + block + struct.pack("<I", len(elf))
    setup = bytearray(4 * 512)
    setup[0x1F1] = 3
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0, len(payload))
    return bytes(setup) + payload


@pytest.fixture
def fake_deb(tmp_path: Path) -> Path:
    require_tool("dpkg-deb", "depmod")
    tree = tmp_path / "deb"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: linux-image-{VERSION}\nVersion: 1\nArchitecture: amd64\n"
        "Maintainer: fcvm tests <t@example.invalid>\nDescription: fake kernel\n"
    )
    (tree / "boot").mkdir()
    (tree / "boot" / f"vmlinuz-{VERSION}").write_bytes(_fake_bzimage())
    (tree / "boot" / f"config-{VERSION}").write_text("CONFIG_PHYSICAL_START=0x1000000\n")
    moddir = tree / "lib" / "modules" / VERSION / "kernel"
    moddir.mkdir(parents=True)
    for name in REQUIRED_MODULES:  # not real ELF modules: depmod records them with no dependencies
        (moddir / f"{name}.ko").write_bytes(b"fake module " + name.encode())
    out = tmp_path / "linux-image-fake.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    return out


@pytest.fixture
def agent_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "agent"
    for package in initramfs.AGENT_PACKAGES:
        (root / package / "__pycache__").mkdir(parents=True)
        (root / package / "__init__.py").write_text(f'"""{package}"""\n')
        (root / package / "__pycache__" / "junk.cpython-311.pyc").write_bytes(b"ignored")
    (root / "fc_agent" / "__main__.py").write_text("print('agent')\n")
    (root / "fc_agent" / "notes.txt").write_text("not python")
    monkeypatch.setattr(initramfs, "_agent_roots", lambda: [(p, root / p) for p in initramfs.AGENT_PACKAGES])
    return root


@pytest.fixture
def fake_busybox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    binary = tmp_path / "busybox"
    binary.write_bytes(b"\x7fELF fake busybox")
    monkeypatch.setattr(debs, "busybox_binary", lambda note=None: binary)
    return binary


def _read_cpio(path: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """name -> (mode, rdev major, rdev minor, data) of a gzipped newc archive."""
    data = gzip.decompress(path.read_bytes())
    entries: dict[str, tuple[int, int, int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, rmaj, rmin, body)


def test_digest_is_stable_and_unambiguous() -> None:
    assert assets.digest(["a", "bc"]) == assets.digest(["a", b"bc"])
    assert assets.digest(["ab", "c"]) != assets.digest(["a", "bc"])
    assert len(assets.digest(["x"])) == assets.NAME_DIGITS


def test_apt_file_names_escape_the_epoch() -> None:
    cand = debs.Candidate("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64", 1)
    assert cand.filename == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"


def test_same_inputs_give_the_same_assets(fake_deb: Path, agent_tree: Path, fake_busybox: Path) -> None:
    assert kernel.find_kernel() is None
    first = kernel.ensure_kernel(fake_deb, progress=False)
    assert first.version == VERSION
    assert first.bzimage.parent.name.startswith("kernel-")
    assert first.initramfs.name.startswith("initramfs-") and first.initramfs.name.endswith(".cpio.gz")
    assert first.vmlinux.read_bytes().startswith(b"\x7fELF")
    assert (first.modules / "modules.dep").is_file()
    before = first.vmlinux.stat().st_mtime_ns
    second = kernel.ensure_kernel(fake_deb, progress=False)
    assert second == first
    assert second.vmlinux.stat().st_mtime_ns == before  # not rebuilt
    assert kernel.find_kernel() == first
    # Files the initramfs ignores (non-*.py, __pycache__) do not change its name.
    (agent_tree / "fc_agent" / "notes.txt").write_text("edited")
    (agent_tree / "fc_agent" / "__pycache__" / "junk.cpython-311.pyc").write_bytes(b"edited")
    assert kernel.find_kernel() == first


def test_agent_change_rebuilds_only_the_initramfs(
    fake_deb: Path, agent_tree: Path, fake_busybox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kernel.ensure_kernel(fake_deb, progress=False)
    kernel_inode = first.vmlinux.stat().st_ino
    (agent_tree / "fc_agent" / "__main__.py").write_text("print('agent v2')\n")
    assert kernel.find_kernel() is None  # stale for the current agent sources; find never builds

    def no_kernel_build(*args: object) -> None:
        raise AssertionError("an agent-only change rebuilt the kernel directory")

    monkeypatch.setattr(kernel, "_build_kernel_dir", no_kernel_build)
    second = kernel.ensure_kernel(fake_deb, progress=False)
    assert second.initramfs != first.initramfs
    assert (second.bzimage, second.vmlinux, second.modules) == (first.bzimage, first.vmlinux, first.modules)
    assert second.vmlinux.stat().st_ino == kernel_inode
    assert kernel.find_kernel() == second
    # The run path may ask find_kernel to refresh a stale initramfs itself (local, no download).
    (agent_tree / "fcvm_wire" / "__init__.py").write_text('"""wire v2"""\n')
    assert kernel.find_kernel() is None
    third = kernel.find_kernel(refresh_initramfs=True)
    assert third is not None and third.initramfs not in (first.initramfs, second.initramfs)
    assert third.vmlinux == first.vmlinux and kernel.find_kernel() == third
    # The rootfs is named by the kernel package and the recipe, never by the agent.
    deb_sha = assets.sha256_file(fake_deb)
    assert rootfs.rootfs_name(deb_sha) == rootfs.rootfs_name(deb_sha)
    assert rootfs.rootfs_name(deb_sha) != rootfs.rootfs_name("0" * 64)


def test_a_read_only_assets_dir_is_used_but_never_built_into(
    fake_deb: Path, agent_tree: Path, fake_busybox: Path, private_assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user sharing root's assets (FCVM_ASSETS_DIR) cannot write there: existing assets work; an fcvm whose
    agent differs builds its own initramfs in the user's data dir; what cannot be built anywhere is a clear
    error, not a traceback about a lock file."""
    built = kernel.ensure_kernel(fake_deb, progress=False)
    real_ensure_dir = paths.ensure_dir
    unwritable = [private_assets]

    def read_only(path: Path, mode: int = 0o755) -> Path:
        if any(Path(path).is_relative_to(d) for d in unwritable):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_ensure_dir(path, mode)

    monkeypatch.setattr(paths, "ensure_dir", read_only)
    assert kernel.find_kernel(refresh_initramfs=True) == built
    (agent_tree / "fc_agent" / "__main__.py").write_text("print('agent v2')\n")
    own = kernel.find_kernel(refresh_initramfs=True)
    assert own is not None and own.initramfs.parent == paths.data_dir() / "assets"
    assert own.vmlinux == built.vmlinux  # the kernel stays shared
    assert b"agent v2" in gzip.decompress(own.initramfs.read_bytes())
    assert not any(p.name == own.initramfs.name for p in private_assets.iterdir())
    assert kernel.find_kernel() == own  # found again without a build

    (agent_tree / "fc_agent" / "__main__.py").write_text("print('agent v3')\n")
    unwritable.append(paths.data_dir())
    with pytest.raises(assets.AssetsNotWritable) as info:
        kernel.find_kernel(refresh_initramfs=True)
    assert "cannot write there to build it" in str(info.value)


def test_rootfs_name_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    before = rootfs.rootfs_name("abc")
    monkeypatch.setitem(rootfs.CONFIG_FILES, "etc/hostname", ("other\n", 0o644))
    assert rootfs.rootfs_name("abc") != before
    monkeypatch.setattr(rootfs, "PACKAGES", (*rootfs.PACKAGES, "curl"))
    assert rootfs.rootfs_name("abc") != before


def test_initramfs_contents(fake_deb: Path, agent_tree: Path, fake_busybox: Path) -> None:
    built = kernel.ensure_kernel(fake_deb, progress=False)
    entries = _read_cpio(built.initramfs)
    mode, major, minor, _ = entries["dev/console"]
    assert stat.S_ISCHR(mode) and (major, minor) == (5, 1)
    assert entries["bin/busybox"][3] == fake_busybox.read_bytes()
    assert stat.S_ISLNK(entries["bin/switch_root"][0]) and entries["bin/switch_root"][3] == b"busybox"
    init = entries["init"][3].decode()
    assert entries["init"][0] & 0o111 and init.startswith("#!/bin/sh")
    loads = [line.split() for line in init.splitlines() if line.startswith("load ")]
    assert [words[1] for words in loads] == list(REQUIRED_MODULES)  # fake modules: no dependencies
    assert all(words[3] == "1" for words in loads)
    for name in REQUIRED_MODULES:
        assert entries[f"lib/modules/{name}.ko"][3] == b"fake module " + name.encode()
    assert "exec switch_root /newroot /usr/bin/python3 -m fc_agent" in init
    assert "PYTHONPATH=/opt/fc-agent" in init and "poweroff -f" in init
    assert entries["fc-agent/fc_agent/__main__.py"][3] == b"print('agent')\n"
    assert "fc-agent/fc_agent/notes.txt" not in entries
    assert "fc-agent/fc_agent/__pycache__/junk.cpython-311.pyc" not in entries
    if sys.version_info[:2] == initramfs.GUEST_PYTHON:
        assert f"fc-agent/fc_agent/__pycache__/__main__.{sys.implementation.cache_tag}.pyc" in entries


def test_a_failed_build_leaves_nothing_that_looks_done(
    fake_deb: Path, agent_tree: Path, fake_busybox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(_image: bytes) -> bytes:
        raise RuntimeError("killed mid-build")

    real_extract = kernel.extract_vmlinux
    monkeypatch.setattr(kernel, "extract_vmlinux", boom)
    with pytest.raises(RuntimeError):
        kernel.ensure_kernel(fake_deb, progress=False)
    leftovers = [p.name for p in paths.assets_dir().iterdir() if p.name != ".locks"]
    assert leftovers == []
    assert kernel.find_kernel() is None
    # A partial build of a builder that died (its pid is gone) is swept on the next run.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = paths.assets_dir() / f".kernel-0000.tmp-{dead.pid}"
    stale.mkdir()
    monkeypatch.setattr(kernel, "extract_vmlinux", real_extract)
    kernel.ensure_kernel(fake_deb, progress=False)
    assert not stale.exists()


def test_host_tsc_and_boot_args() -> None:
    khz = kernel.host_tsc_khz()
    assert 100_000 < khz < 10_000_000
    args = kernel.qemu_boot_args().split()
    assert f"tsc_early_khz={khz}" in args
    assert {"console=ttyS0", "tsc=reliable", "panic=-1"} <= set(args)


def test_find_without_assets(private_assets: Path) -> None:
    assert not private_assets.exists()
    assert kernel.find_kernel() is None
    assert rootfs.find_rootfs() is None
    private_assets.mkdir(parents=True)
    (private_assets / "kernel-0123456789abcdef").mkdir()  # incomplete: no kernel.json
    assert kernel.find_kernel() is None
    assert rootfs.find_rootfs() is None
