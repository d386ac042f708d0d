"""Uncompressed ELF `vmlinux` from an LZ4 bzImage (Firecracker <= 1.16 boots only ELF kernels on x86_64).

The bzImage payload of Debian's kernel is LZ4 in the *legacy* frame format: the magic `02 21 4C 18`,
then blocks of `[u32 little-endian compressed size][block]`, each decompressing to at most 8 MiB.
python-lz4's `lz4.frame` does not read that format; `lz4.block.decompress` does, block by block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fcvm.core.errors import FcvmError

LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LEGACY_BLOCK_SIZE = 8 << 20
_ELF_MAGIC = b"\x7fELF"


class VmlinuxError(FcvmError):
    pass


def payload_span(bzimage: bytes) -> tuple[int, int, bool]:
    """(offset, length, exact) of the compressed kernel inside a bzImage: exact from the boot protocol
    header (>= 2.08 has payload_offset/payload_length), else from a scan for the LZ4 legacy magic
    (then the length runs to the end of the file)."""
    if len(bzimage) > 0x250 and bzimage[0x202:0x206] == b"HdrS":
        version = struct.unpack_from("<H", bzimage, 0x206)[0]
        if version >= 0x208:
            setup_sects = bzimage[0x1F1] or 4
            offset, length = struct.unpack_from("<II", bzimage, 0x248)
            start = (setup_sects + 1) * 512 + offset
            if start + length <= len(bzimage) and bzimage[start : start + 4] == LEGACY_MAGIC:
                return start, length, True
    start = bzimage.find(LEGACY_MAGIC)
    if start < 0:
        raise VmlinuxError("no LZ4 payload in the kernel image (is it an LZ4 bzImage?)")
    return start, len(bzimage) - start, False


def decompress_legacy_lz4(data: bytes) -> bytes:
    """Decompress an LZ4 legacy-frame stream. Stops at the end of the data, at a size that does not
    fit, or at a block that fails to decompress (the kernel appends the uncompressed size, and other
    bytes may follow the last block). A repeated magic (concatenated streams) is skipped."""
    import lz4.block

    if not data.startswith(LEGACY_MAGIC):
        raise VmlinuxError("not an LZ4 legacy frame (magic 02 21 4C 18 missing)")
    out: list[bytes] = []
    pos = len(LEGACY_MAGIC)
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if data[pos : pos + 4] == LEGACY_MAGIC:
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break
        block = data[pos + 4 : pos + 4 + size]
        try:
            out.append(lz4.block.decompress(block, uncompressed_size=LEGACY_BLOCK_SIZE))
        except lz4.block.LZ4BlockError:
            if not out:
                raise VmlinuxError("the first LZ4 block does not decompress") from None
            break
        pos += 4 + size
    if not out:
        raise VmlinuxError("the LZ4 stream holds no blocks")
    return b"".join(out)


@dataclass(frozen=True)
class ElfInfo:
    entry: int
    machine: int
    load_paddrs: tuple[int, ...]


def elf_info(image: bytes) -> ElfInfo:
    """Entry point, machine and PT_LOAD physical addresses of a 64-bit little-endian ELF."""
    if not image.startswith(_ELF_MAGIC) or image[4] != 2 or image[5] != 1:
        raise VmlinuxError("not a 64-bit little-endian ELF")
    machine = struct.unpack_from("<H", image, 18)[0]
    entry = struct.unpack_from("<Q", image, 24)[0]
    phoff = struct.unpack_from("<Q", image, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", image, 54)
    paddrs = []
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type = struct.unpack_from("<I", image, base)[0]
        if p_type == 1:  # PT_LOAD
            paddrs.append(struct.unpack_from("<Q", image, base + 24)[0])
    return ElfInfo(entry=entry, machine=machine, load_paddrs=tuple(paddrs))


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside an LZ4 bzImage."""
    start, length, exact = payload_span(bzimage)
    payload = bzimage[start : start + length]
    image = decompress_legacy_lz4(payload)
    if exact and length >= 4:
        # The kernel build appends the uncompressed length as the payload's last four bytes.
        (expected,) = struct.unpack("<I", payload[-4:])
        if len(image) < expected:
            raise VmlinuxError(f"the LZ4 payload is truncated: {len(image)} of {expected} bytes")
        image = image[:expected]
    if not image.startswith(_ELF_MAGIC):
        raise VmlinuxError("the decompressed kernel is not an ELF image")
    return image
