from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

_TIERS = ("unit", "root", "vm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The directory a test lives in is its tier: tests/unit, tests/root, tests/vm."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own fcvm data directory, so no test sees another's state."""
    path = tmp_path_factory.mktemp("fcvm-data")
    monkeypatch.setenv("FCVM_DATA_DIR", str(path))
    yield path
