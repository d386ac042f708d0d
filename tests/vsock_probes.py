"""Tiny static x86-64 programs that try to create a socket and exit with the errno (0 when it worked).

No compiler or libc is needed, and nothing in the demo images can call socket(AF_VSOCK): each program is a
hand-assembled ELF of one segment. The variants are the ways a process could reach socket():
- `native(family)`: the 64-bit `socket` system call, family passed in all 64 bits of the register (the kernel
  reads only the low 32, so 0x1_0000_0028 is AF_VSOCK to the kernel);
- `compat_socket(family)` and `compat_socketcall(family)`: the 32-bit ABI through `int 0x80`, either the direct
  `socket` call or `socketcall(SYS_SOCKET, args)` with the family in memory.
A program killed by seccomp (SIGSYS) does not exit at all.
"""

from __future__ import annotations

import struct
from pathlib import Path

AF_UNIX = 1
AF_VSOCK = 40
_BASE = 0x400000
_HEADERS = 64 + 56
# eax holds the result: exit(0) when >= 0, else exit(-eax).
_EXIT_WITH_ERRNO = (b"\x85\xc0"  # test eax, eax
                    b"\x78\x04"  # js negative
                    b"\x31\xff"  # xor edi, edi
                    b"\xeb\x04"  # jmp exit
                    b"\x89\xc7\xf7\xdf"  # negative: mov edi, eax; neg edi
                    b"\xb8\x3c\x00\x00\x00\x0f\x05")  # exit: mov eax, 60 (exit); syscall


def _elf(code: bytes) -> bytes:
    header = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 0x3E, 1, _BASE + _HEADERS,
                         64, 0, 0, 64, 56, 1, 0, 0, 0)
    size = _HEADERS + len(code)
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return header + segment + code


def native(family: int) -> bytes:
    """socket(family, SOCK_STREAM, 0) through `syscall`, family as a 64-bit value."""
    return _elf(b"\x48\xbf" + struct.pack("<Q", family)  # mov rdi, family
                + b"\xb8\x29\x00\x00\x00"  # mov eax, 41 (socket)
                + b"\xbe\x01\x00\x00\x00\x31\xd2\x0f\x05"  # mov esi, 1; xor edx, edx; syscall
                + _EXIT_WITH_ERRNO)


def compat_socket(family: int) -> bytes:
    """socket(family, SOCK_STREAM, 0) through the 32-bit ABI's direct call (359)."""
    return _elf(b"\xb8\x67\x01\x00\x00\xbb" + struct.pack("<I", family)  # mov eax, 359; mov ebx, family
                + b"\xb9\x01\x00\x00\x00\x31\xd2\xcd\x80"  # mov ecx, 1; xor edx, edx; int 0x80
                + _EXIT_WITH_ERRNO)


def compat_socketcall(family: int) -> bytes:
    """socketcall(SYS_SOCKET, {family, SOCK_STREAM, 0}) through the 32-bit ABI: the family in memory."""
    head = b"\xb8\x66\x00\x00\x00\xbb\x01\x00\x00\x00\xb9"  # mov eax, 102; mov ebx, 1 (SYS_SOCKET); mov ecx,
    tail = b"\xcd\x80" + _EXIT_WITH_ERRNO  # int 0x80
    arguments = _BASE + _HEADERS + len(head) + 4 + len(tail)
    return _elf(head + struct.pack("<I", arguments) + tail + struct.pack("<III", family, 1, 0))


PROBES = {
    "vsock": native(AF_VSOCK),
    "vsock-high-bits": native((1 << 32) | AF_VSOCK),
    "vsock-i386": compat_socket(AF_VSOCK),
    "vsock-socketcall": compat_socketcall(AF_VSOCK),
    "unix": native(AF_UNIX),
}


def write_probes(directory: Path) -> dict[str, Path]:
    """Every probe as an executable file in `directory`."""
    written = {}
    for name, program in PROBES.items():
        path = directory / name
        path.write_bytes(program)
        path.chmod(0o755)
        written[name] = path
    return written
