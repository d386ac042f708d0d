"""envd's filesystem, answered by short POSIX sh scripts run in the sandbox's container (busybox has every tool
they use). A script reports a missing path, a path of the wrong kind and one already there by its exit code;
entries come back as one line each, `fcvm1 HEXMODE SIZE PERMS OWNER GROUP MTIME PATH`, and are parsed here.
The container is untrusted: what it prints is parsed totally and bounded in size."""

from __future__ import annotations

import posixpath
import stat
import time
from collections.abc import Iterator
from typing import Any

from fcvm.serve.connect import Code, ConnectError

MISSING, WRONG_KIND, EXISTS = 44, 45, 46
_STAT = "stat -c 'fcvm1 %f %s %a %U %G %Y %n' --"
_PATH_EXISTS = '{ [ -e "$1" ] || [ -L "$1" ] || exit 44; }'

STAT = f"""{_PATH_EXISTS}
{_STAT} "$1" || exit 1
if [ -L "$1" ]; then printf 'fcvm1-link '; readlink -- "$1"; fi"""

LIST_DIR = f"""{_PATH_EXISTS}
[ -d "$1" ] || exit 45
find "$1" -mindepth 1 -maxdepth "$2" -exec {_STAT} {{}} +"""

MAKE_DIR = f"""[ -e "$1" ] && exit 46
mkdir -p -- "$1" && {_STAT} "$1\""""

MOVE = f"""{_PATH_EXISTS}
if [ -d "$2" ] && [ ! -L "$2" ]; then exit 46; fi
mkdir -p -- "$(dirname -- "$2")" && mv -f -- "$1" "$2" && {_STAT} "$2\""""

REMOVE = f"""{_PATH_EXISTS}
rm -rf -- "$1\""""

READ = """[ -e "$1" ] || exit 44
[ -d "$1" ] && exit 45
exec cat -- "$1\""""

WRITE = """[ -d "$1" ] && exit 45
mkdir -p -- "$(dirname -- "$1")" || exit 1
exec cat > "$1\""""

# Go's os.FileMode, as envd reports it: the type in the high bits, the permissions in the low nine.
_GO_DIR, _GO_SYMLINK = 1 << 31, 1 << 27
_MAX_NAME = 4096


def error_for(code: int, path: str, stderr: bytes) -> ConnectError:
    """The Connect error a script's exit code stands for."""
    if code == MISSING:
        return ConnectError(Code.NOT_FOUND, f"path '{path}' does not exist")
    if code == WRONG_KIND:
        return ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' is not of the kind this call needs")
    if code == EXISTS:
        return ConnectError(Code.ALREADY_EXISTS, f"path '{path}' already exists")
    detail = stderr.decode(errors="replace").strip()[-500:] or f"exit code {code}"
    return ConnectError(Code.INTERNAL, f"'{path}': {detail}")


def _go_permissions(mode: int) -> str:
    kind = "d" if stat.S_ISDIR(mode) else "L" if stat.S_ISLNK(mode) else "-"
    bits = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return kind + bits


def _file_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "FILE_TYPE_DIRECTORY"
    if stat.S_ISLNK(mode):
        return "FILE_TYPE_SYMLINK"
    if stat.S_ISREG(mode):
        return "FILE_TYPE_FILE"
    return "FILE_TYPE_UNSPECIFIED"


def _entry(line: str) -> dict[str, Any] | None:
    parts = line.split(" ", 7)
    if len(parts) != 8 or parts[0] != "fcvm1":
        return None
    _, hex_mode, size, _, owner, group, mtime, path = parts
    try:
        mode, size_bytes, seconds = int(hex_mode, 16), int(size), int(mtime)
    except ValueError:
        return None
    if not (0 <= mode < 1 << 32 and 0 <= size_bytes < 1 << 63 and 0 <= seconds < 1 << 40) or len(path) > _MAX_NAME:
        return None
    go_mode = (mode & 0o777) | (_GO_DIR if stat.S_ISDIR(mode) else _GO_SYMLINK if stat.S_ISLNK(mode) else 0)
    return {
        "name": posixpath.basename(path.rstrip("/")) or path, "type": _file_type(mode),
        "path": posixpath.normpath(path) if path else path, "size": str(size_bytes), "mode": go_mode,
        "permissions": _go_permissions(mode), "owner": owner, "group": group,
        "modifiedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)),
    }


def entries(output: bytes) -> Iterator[dict[str, Any]]:
    """The entries in a script's output. A line that is no record continues the previous record's name (a name
    with a newline in it) or, after `fcvm1-link`, gives a symlink's target."""
    current: dict[str, Any] | None = None
    raw_path = ""
    for line in output.decode(errors="replace").split("\n"):
        if line.startswith("fcvm1 "):
            if current is not None:
                yield current
            current = _entry(line)
            raw_path = line.split(" ", 7)[-1] if current else ""
        elif line.startswith("fcvm1-link ") and current is not None:
            current["symlinkTarget"] = line.removeprefix("fcvm1-link ")
        elif current is not None and line:
            raw_path = f"{raw_path}\n{line}"
            current["path"] = posixpath.normpath(raw_path)
            current["name"] = posixpath.basename(current["path"])
    if current is not None:
        yield current


def one_entry(output: bytes, path: str) -> dict[str, Any]:
    found = next(entries(output), None)
    if found is None:
        raise ConnectError(Code.INTERNAL, f"the sandbox gave no information on '{path}'")
    return found
