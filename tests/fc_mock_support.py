"""fcvm-fc-mock in tests without a guest: the executable and the official spec it checks every body against
(tests.sleeping_vm has a backend that runs `sleep` where fc-mock would boot QEMU)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support import require

SPEC_PATH = Path(__file__).resolve().parents[1].parent / "shared/firecracker/firecracker-v1.16.1.yaml"


def fc_mock_binary() -> Path:
    found = shutil.which("fcvm-fc-mock")
    require(found is not None, "fcvm-fc-mock is not installed (pip install -e .)")
    assert found is not None
    return Path(found)


def official_spec() -> Path:
    require(SPEC_PATH.is_file(), f"the official Firecracker spec is missing at {SPEC_PATH}")
    return SPEC_PATH
