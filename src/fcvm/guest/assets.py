"""Shared plumbing for content-addressed guest assets: hashing, atomic publication, locks, progress."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from fcvm.core import log, paths
from fcvm.core.errors import FcvmError

_log = log.get("guest")

# Names are the first 16 hex digits of a sha256: 64 bits is plenty to tell recipes apart.
NAME_DIGITS = 16
_TMP_MARK = ".tmp-"


def digest(parts: Iterable[str | bytes]) -> str:
    """A stable hash of an ordered list of inputs (each part is length-prefixed, so
    ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:NAME_DIGITS]


def sha256_file(path: Path) -> str:
    """sha256 of a file. Large inputs (.debs) are hashed once: the result is remembered beside the
    file, keyed by size and mtime, when that directory is writable."""
    st = path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}"
    side = path.with_name(path.name + ".sha256")
    try:
        cached = side.read_text().split()
        if len(cached) == 2 and cached[1] == key:
            return cached[0]
    except OSError:
        pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    value = h.hexdigest()
    if st.st_size > (1 << 20):
        with contextlib.suppress(OSError):
            write_text_atomic(side, f"{value} {key}\n")
    return value


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def tmp_path(final: Path) -> Path:
    """A sibling of `final` to build into; `sweep_stale` removes it if this process dies."""
    return final.with_name(f".{final.name}{_TMP_MARK}{os.getpid()}")


def publish(tmp: Path, final: Path) -> bool:
    """Atomically give a finished build its final name. False (and `tmp` removed) if another
    builder got there first, which is fine: same name, same content."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if final.exists():
            remove(tmp)
            return False
        raise


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh sibling of `final` to build into: published as `final` when the block ends without an error,
    removed otherwise (and by `sweep_stale` should this process die first)."""
    tmp = tmp_path(final)
    remove(tmp)
    try:
        yield tmp
        publish(tmp, final)
    finally:
        remove(tmp)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_TMP_RE = re.compile(r"^\..*" + re.escape(_TMP_MARK) + r"(\d+)$")


def sweep_stale(directory: Path) -> None:
    """Remove half-built assets left by builders that were killed."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        match = _TMP_RE.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        _log.debug("removing stale partial asset %s", entry)
        try:
            remove(entry)
        except OSError as exc:  # e.g. another user's leftover in a shared assets dir
            _log.debug("cannot remove %s: %s", entry, exc)


class AssetsNotWritable(FcvmError):
    pass


@contextlib.contextmanager
def build_lock(name: str, root: Path | None = None) -> Iterator[None]:
    """Serialise builders of the same asset in `root` (default: the assets dir), e.g. two `fcvm setup` runs.

    Only a build takes it: using assets that exist never writes to the assets dir, so a user can share one
    that root built (`FCVM_ASSETS_DIR`). Building one there without write access is a clear error."""
    root = root or paths.assets_dir()
    try:
        lock_dir = paths.ensure_dir(root / ".locks")
        handle = (lock_dir / f"{name}.lock").open("a")
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise AssetsNotWritable(
            f"{name} is missing in {root} and this user cannot write there to build it",
            hint=f"have the owner of {root} run `fcvm setup kernel` and `fcvm setup rootfs` with this version of "
                 f"fcvm, or set {paths.ASSETS_DIR_ENV} to a directory you own",
        ) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def touch(path: Path) -> None:
    """Mark an asset as the most recently ensured one (`find_*` prefers it)."""
    now = time.time()
    with contextlib.suppress(OSError):
        os.utime(path, (now, now))


class Steps:
    """A rich progress bar over the named steps of a build, or plain log lines when disabled."""

    def __init__(self, title: str, total: int, *, enabled: bool) -> None:
        self.title = title
        self.total = total
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._active = False

    def __enter__(self) -> Steps:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[title]}[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=self.total, title=self.title)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            if exc is None:
                self._progress.update(self._task, completed=self.total, description="done")
            self._progress.stop()

    def step(self, description: str) -> None:
        """Finish the current step (if any) and start the next one."""
        _log.log(logging.DEBUG if self._progress is not None else logging.INFO, "%s: %s", self.title, description)
        if self._progress is not None:
            if self._active:
                self._progress.advance(self._task)
            self._progress.update(self._task, description=description)
        self._active = True

    def note(self, description: str) -> None:
        """Change the text of the current step without advancing (e.g. megabytes downloaded)."""
        if self._progress is not None:
            self._progress.update(self._task, description=description)
