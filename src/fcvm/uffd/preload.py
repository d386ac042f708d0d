"""The LD_PRELOAD library that gives a QEMU guest's RAM to the UFFD page server, Firecracker-style.

QEMU cannot hand its guest memory to an external page server; `native/uffd_preload.c`, preloaded into
QEMU, registers the RAM mapping with a userfaultfd and sends Firecracker's handshake to the server.
This module builds that library (content-addressed, so a changed source or compiler never reuses a stale
build), finds a built one, gives the environment that activates it, and checks that it took effect:
the library cannot notice a RAM mapping it never saw, so the launcher must call `verify_client` before
`migrate-incoming` and kill QEMU when it returns False.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fcvm.core import log, proc
from fcvm.core.errors import FcvmError

_log = log.get("uffd")

SOURCE = Path(__file__).parent / "native" / "uffd_preload.c"
SOCKET_ENV = "FCVM_UFFD_SOCKET"
SOCKET_FD_ENV = "FCVM_UFFD_SOCKET_FD"
DEVICE_FD_ENV = "FCVM_UFFD_DEV_FD"
MEM_SIZE_ENV = "FCVM_UFFD_MEM_SIZE"
PROGRAM_ENV = "FCVM_UFFD_PROGRAM"
USERFAULTFD_LINK = "anon_inode:[userfaultfd]"
# --as-needed: glibc >= 2.34 has dlsym in libc itself, older ones need libdl; link it only where needed.
_FLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Werror")
_LIBS = ("-Wl,--as-needed", "-ldl")
_PREFIX = "libfcvm-uffd-"
_SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL


def _compiler() -> str:
    for name in ("cc", "gcc"):
        if path := shutil.which(name):
            return path
    raise FcvmError("no C compiler (cc or gcc) to build the UFFD preload library",
                    hint="install gcc, or ship a prebuilt library")


def library_name(source: Path = SOURCE) -> str:
    """`libfcvm-uffd-<16 hex>.so`, the hex from the source, the compiler's version and the flags."""
    compiler = _compiler()
    version = proc.run([compiler, "--version"], timeout=30).stdout
    digest = hashlib.sha256()
    for part in (source.read_bytes(), version, " ".join(_FLAGS + _LIBS).encode()):
        digest.update(len(part).to_bytes(8, "little") + part)  # length-prefixed: no two inputs collide
    return f"{_PREFIX}{digest.hexdigest()[:16]}.so"


def build(dest_dir: Path, source: Path = SOURCE) -> Path:
    """Compile `source` into `dest_dir` under its content-addressed name, unless that file already exists.

    The compiler writes a temporary file that is renamed into place, so a concurrent or interrupted build
    never leaves a half-written library under the final name.
    """
    target = dest_dir / library_name(source)
    if target.exists():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{_PREFIX}", suffix=".so.tmp", dir=dest_dir)
    os.close(fd)
    temp = Path(temp_name)
    try:
        proc.run([_compiler(), *_FLAGS, "-o", temp, source, *_LIBS], timeout=120)
        temp.chmod(0o644)  # QEMU may run as another user; it only needs to read the library
        temp.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    _log.info("built the UFFD preload library %s", target)
    return target


def find(dest_dirs: Iterable[Path], source: Path = SOURCE) -> Path | None:
    """The library built from the current source and compiler in the first of `dest_dirs` holding it."""
    name = library_name(source)
    for directory in dest_dirs:
        if (candidate := directory / name).is_file():
            return candidate
    return None


def env_for(server: Path | int, mem_bytes: int, library: Path, program: str | None = None,
            device_fd: int | None = None) -> dict[str, str]:
    """The environment variables that make QEMU hand `mem_bytes` of guest RAM to the page server: `server` is
    its socket's path, or a socket already connected to it that QEMU inherits (an unprivileged QEMU can reach
    neither the socket nor, in `device_fd`, /dev/userfaultfd: its launcher opens them).

    `program` (an executable's file name) limits that to the process running it: wrappers that exec QEMU
    (nsenter into the VM's namespaces) then pass the configuration on untouched."""
    library = library.absolute()
    # ld.so splits LD_PRELOAD at spaces and colons.
    if any(c in str(library) for c in " :"):
        raise ValueError(f"the preload library path must not contain spaces or colons: {library}")
    if isinstance(server, Path) and len(os.fsencode(server)) > _SOCKET_PATH_MAX:
        raise ValueError(f"socket path longer than {_SOCKET_PATH_MAX} bytes: {server}")
    if mem_bytes <= 0 or mem_bytes % mmap.PAGESIZE:
        raise ValueError(f"guest RAM size {mem_bytes} is not a positive multiple of the page size")
    env = {"LD_PRELOAD": str(library), MEM_SIZE_ENV: str(mem_bytes),
           **({SOCKET_ENV: str(server)} if isinstance(server, Path) else {SOCKET_FD_ENV: str(server)})}
    if program is not None:
        env[PROGRAM_ENV] = program
    if device_fd is not None:
        env[DEVICE_FD_ENV] = str(device_fd)
    return env


def verify_client(qemu_pid: int) -> bool:
    """True if process `qemu_pid` holds a userfaultfd, i.e. the library registered its guest RAM.

    False when it holds none, or when its fds cannot be read (gone, or not ours to inspect): the caller
    must then not restore into it, since its RAM would read as zeros.
    """
    fd_dir = Path(f"/proc/{qemu_pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError as exc:
        _log.warning("cannot list %s: %s", fd_dir, exc)
        return False
    for entry in entries:
        with contextlib.suppress(OSError):  # an fd closed since the listing
            if os.readlink(entry) == USERFAULTFD_LINK:
                return True
    _log.error("QEMU pid %d holds no userfaultfd: the preload library did not register its guest RAM", qemu_pid)
    return False
