"""Where fcvm keeps its state, assets and per-VM runtime files, and the modes that keep them private.

The data dir is 0711: other uids may pass through it (a jailed VMM's uid to its jail, users of root's shared
assets to `assets/`) but not list it. What is inside is private by its own mode: the state store, logs,
exported images and snapshots are 0600, per-VM directories 0700, sockets 0600. Only the guest assets are
meant for everyone (0755 directories, 0644 files)."""

from __future__ import annotations

import contextlib
import os
import stat

# pathlib is imported where a Path is made: the read commands (`fcvm ls`) find and open the state store with
# plain strings and never pay for it (about 4 ms, with the urllib and ipaddress modules it brings).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from pathlib import Path
    from typing import TypeVar

    AnyPath = TypeVar("AnyPath", str, Path)

DATA_DIR_ENV = "FCVM_DATA_DIR"
ASSETS_DIR_ENV = "FCVM_ASSETS_DIR"
DATA_DIR_MODE = 0o711
PRIVATE_FILE_MODE = 0o600


def _data_dir() -> str:
    """`FCVM_DATA_DIR`, else /var/lib/fcvm for root, else $XDG_DATA_HOME/fcvm."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return override
    if os.geteuid() == 0:
        return "/var/lib/fcvm"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "fcvm")


def data_dir() -> Path:
    """Where fcvm keeps its state (see `_data_dir`)."""
    from pathlib import Path

    return Path(_data_dir())


def state_db() -> str:
    """The state store's file: a str, so that opening the store needs no pathlib."""
    return os.path.join(_data_dir(), "state.db")


def assets_dir() -> Path:
    """Content-addressed guest assets (kernels, initramfs, rootfs images, image disks).

    `FCVM_ASSETS_DIR` lets several data dirs (e.g. one per test) share one set of built assets."""
    from pathlib import Path

    override = os.environ.get(ASSETS_DIR_ENV)
    return Path(override) if override else data_dir() / "assets"


def cache_dir() -> Path:
    """Downloaded inputs (.deb files, apt archives) that make asset builds work offline."""
    return assets_dir().parent / "cache" if os.environ.get(ASSETS_DIR_ENV) else data_dir() / "cache"


def vms_dir() -> Path:
    return data_dir() / "vms"


def vm_dir(vm_id: str) -> Path:
    """Per-VM disks, sockets and logs. Sockets live here too, so keep the path short."""
    return vms_dir() / vm_id


CONSOLE_LOG = "console.log"  # in vm_logs_dir: the VMM's output, the guest's console (a core.bounded_log)


def vm_logs_dir(vm_id: str) -> Path:
    """Console and container output; outlives the VM (and its disk) until `fcvm rm`."""
    return data_dir() / "logs" / vm_id


def ensure_dir(path: AnyPath, mode: int = 0o755) -> AnyPath:
    """mkdir -p. Inside the data dir, the directories on the way are created like the data dir itself, 0711, and
    the data dir loses others' read and write bits (one made by an older fcvm was 0755)."""
    data = os.path.normpath(_data_dir())
    target = os.path.normpath(path)
    if target == data or target.startswith(data.rstrip(os.sep) + os.sep):
        os.makedirs(data, mode=DATA_DIR_MODE, exist_ok=True)
        _remove_bits(data, 0o066)
        step = data
        for part in os.path.relpath(target, data).split(os.sep)[:-1]:
            step = os.path.join(step, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(step, DATA_DIR_MODE)
    os.makedirs(target, mode=mode, exist_ok=True)
    return path


def snapshots_dir() -> Path:
    """One directory per snapshot: its state stream, memory file, frozen disks and description."""
    return data_dir() / "snapshots"


def make_private(path: AnyPath) -> AnyPath:
    """Create `path` if it is missing, readable and writable by its owner only; an existing file of ours gets
    the same mode. Created that way, never chmod-ed after the fact, so it is never briefly open to others.

    An existing file is never opened: closing any descriptor of a file drops every POSIX lock this process holds
    on it, and sqlite locks the state store that way from other connections of the same process."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         PRIVATE_FILE_MODE))
    except FileExistsError:
        keep_private(path)
    return path


def keep_private(path: str | Path) -> None:
    """Take group and others' access away from an existing file of ours (made by an older fcvm); no-op if absent."""
    _remove_bits(path, 0o077)


def _remove_bits(path: str | Path, bits: int) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & bits:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~bits)


def bind_private(sock: socket.socket, path: Path | str) -> None:
    """Bind a Unix socket only its owner (and root) may connect to. The mode is set on the socket before bind,
    which creates the file with it (less the umask): there is no moment in which another uid could connect."""
    os.fchmod(sock.fileno(), PRIVATE_FILE_MODE)
    sock.bind(os.fspath(path))
