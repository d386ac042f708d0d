"""A File clone's unprivileged QEMU is lent the snapshot's memory file (an ACL entry for its uid) only while it
opens it: other uids never get it, clones starting at once keep each other's grants, and the file ends owner-only
again, with no ACL left."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from fcvm.vmm.qemu import VMM_UID_BASE, lent
from tests.support import require_root, require_tool

ACL = "system.posix_acl_access"


@pytest.fixture
def memory(isolated_data_dir: Path) -> Path:
    """A root-owned 0600 file where snapshots live (the data dir's filesystem, which must have ACLs)."""
    require_root()
    require_tool("setpriv")
    path = isolated_data_dir / "memory"
    path.write_bytes(b"guest memory")
    path.chmod(0o600)
    return path


def _opens_read_write(uid: int, path: Path) -> bool:
    """Can `uid`, with no groups or capabilities, reopen an inherited fd of `path` read-write (QEMU's way in)?"""
    fd = os.open(path, os.O_PATH)
    try:
        probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                                "--bounding-set=-all", "--", "sh", "-c", f"exec 7<>/proc/self/fd/{fd}"],
                               pass_fds=(fd,), capture_output=True, timeout=30, check=False)
    finally:
        os.close(fd)
    return probe.returncode == 0


def _owner_only(path: Path) -> bool:
    return path.stat().st_mode & 0o777 == 0o600 and ACL not in os.listxattr(path)


def test_only_the_borrowing_uid_may_open_the_file_and_only_while_it_is_lent(memory: Path) -> None:
    clone, other = VMM_UID_BASE + 900, VMM_UID_BASE + 901
    assert not _opens_read_write(clone, memory)
    with lent(memory, clone):
        assert _opens_read_write(clone, memory)
        assert not _opens_read_write(other, memory)
        with lent(memory, other):  # a second clone of the snapshot starting meanwhile
            assert _opens_read_write(other, memory)
        assert _opens_read_write(clone, memory), "the other clone's return took this clone's grant"
        assert not _opens_read_write(other, memory)
    assert not _opens_read_write(clone, memory)
    assert _owner_only(memory)
    assert memory.read_bytes() == b"guest memory"


def test_clones_starting_at_once_each_get_their_grant_and_leave_none(memory: Path) -> None:
    uids = [VMM_UID_BASE + 910 + i for i in range(8)]
    everyone_in = threading.Barrier(len(uids))
    results: dict[int, bool] = {}

    def borrow(uid: int) -> None:
        with lent(memory, uid):
            everyone_in.wait(timeout=60)  # every grant is in place at once
            results[uid] = _opens_read_write(uid, memory)
            everyone_in.wait(timeout=60)

    threads = [threading.Thread(target=borrow, args=(uid,)) for uid in uids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == dict.fromkeys(uids, True)
    assert _owner_only(memory)
