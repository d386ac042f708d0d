"""The inode table: FUSE node ids <-> host inodes keyed by (st_dev, st_ino), each held by an O_PATH fd.

Holding an O_PATH fd (instead of a path) keeps hard links, renamed and open-but-deleted files correct and
makes every operation an `*at()` call relative to a directory we hold: paths of any length, and nothing the
guest sends is ever resolved from the host's root. Lookup counts are exact: LOOKUP, CREATE, MKNOD, MKDIR,
SYMLINK, LINK, TMPFILE and each READDIRPLUS entry add one; FORGET / BATCH_FORGET subtract; at zero the fd
is closed and the node id is never reused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable

from fcvm_wire.fusepipe import proto


class Inode:
    __slots__ = ("fd", "fmt", "key", "nlookup", "nodeid", "opens", "wd")

    def __init__(self, nodeid: int, fd: int, key: tuple[int, int], fmt: int) -> None:
        self.nodeid = nodeid
        self.fd = fd
        self.key = key
        self.fmt = fmt
        self.nlookup = 0
        self.wd = -1  # inotify watch descriptor (directories only)
        self.opens = 0  # file handles open on it

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR


class InodeTable:
    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "served path is not a directory")
        self.lock = threading.Lock()
        self.root = Inode(proto.ROOT_ID, root_fd, (st.st_dev, st.st_ino), stat.S_IFDIR)
        self.root.nlookup = 1 << 62  # never forgotten
        self.by_id: dict[int, Inode] = {proto.ROOT_ID: self.root}
        self.by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._next = proto.ROOT_ID + 1
        self.on_new_dir: Callable[[Inode], None] | None = None
        self.on_drop: Callable[[Inode], None] | None = None

    def get(self, nodeid: int) -> Inode:
        ino = self.by_id.get(nodeid)
        if ino is None:
            raise OSError(errno.ESTALE, "unknown node id")
        return ino

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """Register a looked-up host inode (takes ownership of `fd`) and count one lookup."""
        key = (st.st_dev, st.st_ino)
        new: Inode | None = None
        with self.lock:
            ino = self.by_key.get(key)
            if ino is None:
                ino = new = Inode(self._next, fd, key, stat.S_IFMT(st.st_mode))
                self._next += 1
                self.by_id[ino.nodeid] = ino
                self.by_key[key] = ino
            ino.nlookup += 1
        if new is None:
            os.close(fd)
        elif new.is_dir and self.on_new_dir is not None:
            self.on_new_dir(new)
        return ino

    def forget(self, nodeid: int, count: int) -> None:
        with self.lock:
            ino = self.by_id.get(nodeid)
            if ino is None or ino is self.root:
                return
            ino.nlookup -= count
            if ino.nlookup > 0:
                return
            del self.by_id[nodeid]
            if self.by_key.get(ino.key) is ino:
                del self.by_key[ino.key]
        if self.on_drop is not None:
            self.on_drop(ino)
        os.close(ino.fd)

    def lookup_key(self, key: tuple[int, int]) -> Inode | None:
        return self.by_key.get(key)

    def close(self) -> None:
        with self.lock:
            inodes = list(self.by_id.values())
            self.by_id.clear()
            self.by_key.clear()
        for ino in inodes:
            if ino is not self.root:
                with contextlib.suppress(OSError):
                    os.close(ino.fd)

    def __len__(self) -> int:
        return len(self.by_id)
