"""Fixtures shared by the unit tier's test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fc_mock_support import fc_mock_binary, official_spec
from tests.sleeping_vm import SLEEPING_VM


@pytest.fixture
def sleeping_fc_mock(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fcvm-fc-mock executable, set (through the environment its children inherit) to check bodies against
    the official spec and to run SleepingVm instead of QEMU."""
    binary = fc_mock_binary()
    monkeypatch.setenv("FCVM_FC_MOCK_BACKEND", SLEEPING_VM)
    monkeypatch.setenv("FCVM_FC_SPEC", str(official_spec()))
    return binary
