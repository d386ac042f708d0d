"""Firecracker's UFFD handshake: one JSON array of regions plus one userfaultfd by SCM_RIGHTS.

Firecracker never closes the socket, so completeness is decided by scanning the JSON (bracket depth
outside strings), not by EOF. Everything here is pure and total: any input either yields regions or
raises HandshakeError with a message fit for the log.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

MAX_HANDSHAKE = 64 * 1024
MAX_REGIONS = 256
_ADDR_LIMIT = 1 << 64
_WS = b" \t\r\n"
_KEYS = ("base_host_virt_addr", "size", "offset")


class HandshakeError(ValueError):
    """The client's handshake is malformed; the message says how."""


@dataclass(frozen=True, order=True)
class Region:
    """One guest memory region: `size` bytes at `base` in the VM, at `offset` in the memory file."""

    base: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def to_json(self) -> dict[str, int]:
        return {"base_host_virt_addr": self.base, "size": self.size, "offset": self.offset,
                "page_size": self.page_size, "page_size_kib": self.page_size}


class JsonFramer:
    """Finds the end of one JSON array in a byte stream that may arrive in pieces."""

    def __init__(self, limit: int = MAX_HANDSHAKE) -> None:
        self.limit = limit
        self.buf = bytearray()
        self._pos = 0
        self._depth = 0
        self._started = False
        self._in_string = False
        self._escape = False

    def feed(self, data: bytes) -> bytes | None:
        """Add bytes; return the complete array's bytes once its closing bracket arrived, else None."""
        self.buf += data
        buf = self.buf
        i = self._pos
        while i < len(buf):
            c = buf[i]
            if not self._started:
                if c in _WS:
                    i += 1
                    continue
                if c != 0x5B:  # '['
                    raise HandshakeError(f"handshake must be a JSON array, got byte {bytes([c])!r} first")
                self._started = True
                self._depth = 1
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:  # '"'
                    self._in_string = False
            elif c == 0x22:
                self._in_string = True
            elif c in (0x5B, 0x7B):
                self._depth += 1
            elif c in (0x5D, 0x7D):
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    if buf[end:].strip(_WS):
                        raise HandshakeError("unexpected bytes after the handshake's JSON array")
                    self._pos = len(buf)
                    return bytes(buf[:end])
            i += 1
        self._pos = i
        if len(buf) > self.limit:
            raise HandshakeError(f"handshake longer than {self.limit} bytes without a complete JSON array")
        return None


def _int_field(entry: dict[str, Any], key: str, index: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HandshakeError(f"region {index}: {key} must be an integer, got {value!r:.40}")
    if value < 0 or value >= _ADDR_LIMIT:
        raise HandshakeError(f"region {index}: {key}={value} is out of range")
    return value


def parse_regions(payload: bytes, mem_size: int) -> list[Region]:
    """Decode and validate the regions against the memory file's size.

    Rules: a non-empty array of objects with base_host_virt_addr, size, offset and page_size and/or
    page_size_kib (both in bytes, equal when both given); the page size a power of two >= 4096;
    base, size and offset page-aligned; regions disjoint in the VM and in the file; together they
    cover the memory file exactly.
    """
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HandshakeError(f"handshake is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(data, list) or not data:
        raise HandshakeError("handshake must be a non-empty JSON array of regions")
    if len(data) > MAX_REGIONS:
        raise HandshakeError(f"handshake has {len(data)} regions; at most {MAX_REGIONS} are accepted")
    regions: list[Region] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise HandshakeError(f"region {index} is not a JSON object")
        for key in _KEYS:
            if key not in entry:
                raise HandshakeError(f"region {index} lacks {key}")
        base, size, offset = (_int_field(entry, k, index) for k in _KEYS)
        sizes = {_int_field(entry, k, index) for k in ("page_size", "page_size_kib") if k in entry}
        if not sizes:
            raise HandshakeError(f"region {index} lacks page_size")
        if len(sizes) > 1:
            raise HandshakeError(f"region {index}: page_size and page_size_kib differ (both are bytes)")
        page = sizes.pop()
        if page < 4096 or page & (page - 1):
            raise HandshakeError(f"region {index}: page size {page} is not a power of two >= 4096 bytes")
        if size == 0:
            raise HandshakeError(f"region {index} has size 0")
        if base % page or size % page or offset % page:
            raise HandshakeError(f"region {index}: base, size and offset must be multiples of {page}")
        if base + size > _ADDR_LIMIT:
            raise HandshakeError(f"region {index} wraps past the end of the address space")
        if offset + size > mem_size:
            raise HandshakeError(
                f"region {index} ends at file offset {offset + size}, beyond the memory file ({mem_size} bytes)"
            )
        regions.append(Region(base, size, offset, page))
    by_base = sorted(regions)
    for a, b in itertools.pairwise(by_base):
        if b.base < a.end:
            raise HandshakeError(f"regions at {a.base:#x} and {b.base:#x} overlap in the VM's address space")
    by_offset = sorted(regions, key=lambda r: r.offset)
    for a, b in itertools.pairwise(by_offset):
        if b.offset < a.offset + a.size:
            raise HandshakeError(f"regions at file offsets {a.offset} and {b.offset} overlap")
    total = sum(r.size for r in regions)
    if total != mem_size:
        raise HandshakeError(f"regions cover {total} bytes but the memory file has {mem_size}")
    return by_base
