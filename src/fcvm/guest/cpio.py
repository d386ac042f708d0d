"""A minimal writer for the `newc` cpio format the kernel unpacks as an initramfs.

Hand-written because the entries need root-owned files and a /dev/console device node, which GNU cpio
can only archive from a staging tree built by root (mknod); this way the archive is reproducible and
needs no privileges.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    name: str  # path inside the archive, no leading slash
    mode: int  # full st_mode (type | permissions)
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: Entry, name: bytes, size: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime: fixed, for reproducible archives
        size,
        0,  # dev major
        0,  # dev minor
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,  # checksum (unused by newc)
    )
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def archive(entries: list[Entry]) -> bytes:
    """The archive bytes: entries in the given order (parents before children), then the trailer."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.lstrip("/").encode()
        size = len(entry.data) if (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)) else 0
        head = _header(ino if entry.name != "TRAILER!!!" else 0, entry, name, size)
        out += head + name + b"\0"
        out += _pad(len(head) + len(name) + 1)
        if size:
            out += entry.data + _pad(size)
    return bytes(out)
