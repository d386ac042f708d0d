"""PID 1 duties: mount the basics, reap orphans, power off."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_RB_POWER_OFF = 0x4321FEDC
_spawned: set[int] = set()
_spawned_lock = threading.Lock()


def mount(source: str, target: str, fstype: str, options: str = "", flags: int = 0) -> None:
    Path(target).mkdir(parents=True, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode() or None) != 0:
        errno = ctypes.get_errno()
        if errno != 16:  # EBUSY: already mounted
            raise OSError(errno, f"mount {fstype} on {target}: {os.strerror(errno)}")


def boot_mounts() -> None:
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs")
    mount("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777")
    mount("tmpfs", "/run", "tmpfs", "mode=755")
    mount("tmpfs", "/tmp", "tmpfs", "mode=1777")
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2")
    with contextlib.suppress(OSError):
        Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+cpu +memory +pids +io")
    for module in ("overlay", "fuse"):
        subprocess.run(["modprobe", module], check=False, capture_output=True)
    with contextlib.suppress(FileExistsError):
        os.symlink("/proc/self/fd", "/dev/fd")


def spawn(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """Popen that the orphan reaper knows about, so it never steals our own children's exit codes."""
    with _spawned_lock:
        child: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        _spawned.add(child.pid)
    return child


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    child = spawn(argv, **kwargs)
    try:
        stdout, stderr = child.communicate()
    finally:
        with _spawned_lock:
            _spawned.discard(child.pid)
    return subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)


def forget(child: subprocess.Popen[bytes]) -> None:
    with _spawned_lock:
        _spawned.discard(child.pid)


def start_orphan_reaper() -> None:
    """As PID 1 we inherit every orphan (conmon double-forks); reap those, leave our own children alone."""

    def loop() -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is None:
                time.sleep(0.2)
                continue
            with _spawned_lock:
                ours = info.si_pid in _spawned
            if ours:
                time.sleep(0.05)  # its Popen will collect it
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)

    threading.Thread(target=loop, name="reaper", daemon=True).start()


def power_off() -> None:
    os.sync()
    _libc.reboot(_RB_POWER_OFF)
    # If reboot(2) is refused (not PID 1), just exit.
    os._exit(0)
