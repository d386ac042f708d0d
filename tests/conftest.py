from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core import paths

# Built guest assets are expensive and content-addressed: every test shares the real ones.
os.environ.setdefault(paths.ASSETS_DIR_ENV, str(paths.assets_dir()))

_TIERS = ("unit", "root", "vm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The directory a test lives in is its tier: tests/unit, tests/root, tests/vm."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))


_REAL_DATA_DIR = paths.data_dir()


def _scratch_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-test data dirs live inside the real data dir when we can write there, so they sit on the same
    (btrfs) filesystem as the assets and per-VM disks stay reflinks; otherwise in pytest's tmp dir."""
    parent = _REAL_DATA_DIR / "test-data"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return tmp_path_factory.getbasetemp()
    return parent


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own fcvm data directory, so no test sees another's state."""
    path = Path(tempfile.mkdtemp(prefix="t-", dir=_scratch_parent(tmp_path_factory)))
    monkeypatch.setenv("FCVM_DATA_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)
