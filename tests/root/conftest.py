"""Fixtures shared by the root tier's test files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.network import teardown_network
from fcvm.state.journal import Journal
from fcvm.state.store import Store
from fcvm.uffd import ioctls
from tests.root.network_support import Outside, outside_world
from tests.support import require, require_root, require_tool


@pytest.fixture
def network_prerequisites() -> Iterator[None]:
    """Root, the tools and /dev/net/tun that VM networks need; afterwards, whatever the test left journaled is torn
    down, so a failed assertion does not strand namespaces, rules or helper processes on the host."""
    require_root()
    require_tool("iptables", "nsenter", "unshare", "slirp4netns")
    require(Path("/dev/net/tun").exists(), "needs /dev/net/tun")
    yield
    store = Store()
    for owner in store.journal_owners():
        teardown_network(Journal(store, owner))


@pytest.fixture
def outside() -> Iterator[Outside]:
    """A namespace joined to this host by a veth (network_support.outside_world)."""
    with outside_world() as world:
        yield world


def _userfaultfd_works() -> bool:
    try:
        os.close(ioctls.create())
    except OSError:
        return False
    return True


@pytest.fixture
def userfaultfd() -> None:
    """Root and a working userfaultfd (/dev/userfaultfd or the syscall), which the page server needs."""
    require_root()
    require(_userfaultfd_works(), "needs userfaultfd (/dev/userfaultfd or the syscall)")
