"""vmlinux extraction from an LZ4 (legacy frame) bzImage, on synthetic payloads."""

from __future__ import annotations

import os
import struct

import lz4.block
import pytest

from fcvm.guest.vmlinux import (
    LEGACY_BLOCK_SIZE,
    LEGACY_MAGIC,
    VmlinuxError,
    decompress_legacy_lz4,
    elf_info,
    extract_vmlinux,
)


def fake_elf(size: int, entry: int = 0x1000000) -> bytes:
    """A 64-bit x86-64 ELF header with one PT_LOAD at `entry`, padded with compressible filler."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1  # 64-bit, little-endian, version 1
    struct.pack_into("<HHI", header, 16, 2, 62, 1)  # ET_EXEC, EM_X86_64
    struct.pack_into("<QQQ", header, 24, entry, 64, 0)  # e_entry, e_phoff, e_shoff
    struct.pack_into("<HHHH", header, 52, 64, 56, 1, 64)  # ehsize, phentsize, phnum, shentsize
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0xFFFFFFFF81000000, entry, size, size, 0x200000)
    filler = (b"fcvm-kernel-text " * (size // 17 + 1))[: size - len(header) - len(phdr)]
    body = bytes(header) + phdr + filler
    assert len(body) == size
    return body


def legacy_stream(data: bytes, block: int = LEGACY_BLOCK_SIZE) -> bytes:
    out = bytearray(LEGACY_MAGIC)
    for i in range(0, len(data), block):
        compressed = lz4.block.compress(data[i : i + block], store_size=False)
        out += struct.pack("<I", len(compressed)) + compressed
    return bytes(out)


def fake_bzimage(payload: bytes, *, with_header: bool = True, setup_sects: int = 3) -> bytes:
    """Setup sectors with a boot protocol 2.15 header pointing at `payload`, then the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    if with_header:
        setup[0x1F1] = setup_sects
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, 0x20F)
        struct.pack_into("<II", setup, 0x248, 100, len(payload))
        return bytes(setup) + b"\x00" * 100 + payload + b"\xaa" * 64  # pad after, as real images have
    return bytes(setup) + b"\x00" * 100 + payload


def test_multi_block_payload_with_trailing_garbage() -> None:
    image = fake_elf(LEGACY_BLOCK_SIZE + 12345)  # two blocks, the second partial
    stream = legacy_stream(image) + os.urandom(3) + b"\xff\xff\xff\x7f" + os.urandom(50)
    assert decompress_legacy_lz4(stream) == image


def test_extract_from_bzimage_header_trims_to_recorded_size() -> None:
    image = fake_elf(300_000)
    payload = legacy_stream(image) + struct.pack("<I", len(image))  # the kernel appends the size
    vmlinux = extract_vmlinux(fake_bzimage(payload))
    assert vmlinux == image
    info = elf_info(vmlinux)
    assert (info.machine, info.entry, info.load_paddrs) == (62, 0x1000000, (0x1000000,))


def test_extract_without_header_scans_for_the_magic() -> None:
    image = fake_elf(200_000)
    payload = legacy_stream(image, block=64 << 10) + b"\x00\x01garbage that is not a block"
    assert extract_vmlinux(fake_bzimage(payload, with_header=False)) == image


def test_truncated_payload_is_an_error() -> None:
    image = fake_elf(LEGACY_BLOCK_SIZE + 1000)
    stream = legacy_stream(image)
    first_block_end = len(LEGACY_MAGIC) + 4 + struct.unpack_from("<I", stream, 4)[0]
    payload = stream[:first_block_end] + struct.pack("<I", len(image))
    with pytest.raises(VmlinuxError, match="truncated"):
        extract_vmlinux(fake_bzimage(payload))


def test_not_lz4_or_not_elf() -> None:
    with pytest.raises(VmlinuxError, match="no LZ4 payload"):
        extract_vmlinux(b"\x00" * 4096)
    with pytest.raises(VmlinuxError, match="not an ELF"):
        extract_vmlinux(fake_bzimage(legacy_stream(b"MZ not an elf" * 1000), with_header=False))
    with pytest.raises(VmlinuxError, match="magic"):
        decompress_legacy_lz4(b"\x04\x22\x4d\x18 modern frame")
