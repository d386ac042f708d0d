"""Which Firecracker binary to run, and what it says it is.

Order: `--firecracker-bin`, then `FCVM_FIRECRACKER_BIN`, then the one `fcvm setup firecracker`
installed (`<data dir>/bin/firecracker`), then `firecracker` on PATH. An explicit
choice that does not exist is an error (not a silent fall-through). fc-mock is never picked
implicitly: it is named `fcvm-fc-mock` and must be chosen explicitly.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fcvm.core.errors import FcvmError
from fcvm.core.proc import run

BIN_ENV = "FCVM_FIRECRACKER_BIN"
MOCK_MARKER = "(fc-mock)"  # fc-mock's `--version` line ends with this; Firecracker's never does


def _resolve(value: str, source: str) -> Path:
    found = shutil.which(value) if os.sep not in value else value
    if found is None or not os.access(found, os.X_OK) or not Path(found).is_file():
        raise FcvmError(
            f"Firecracker binary {value!r} (from {source}) does not exist or is not executable",
            hint="install one with `fcvm setup firecracker`",
        )
    return Path(found).resolve()


def find_firecracker(explicit: str | None = None) -> Path | None:
    """The Firecracker binary to use, or None if there is none on this host."""
    if explicit:
        return _resolve(explicit, "--firecracker-bin")
    env = os.environ.get(BIN_ENV)
    if env:
        return _resolve(env, BIN_ENV)
    from fcvm.vmm.firecracker.release import installed_binary

    installed = installed_binary()
    if installed is not None:
        return installed.resolve()
    found = shutil.which("firecracker")
    return Path(found).resolve() if found else None


@dataclass(frozen=True)
class BinaryInfo:
    path: Path
    version: str  # "1.16.1"
    mock: bool  # True for fcvm-fc-mock

    @property
    def display_name(self) -> str:
        return "firecracker (fc-mock)" if self.mock else "firecracker"


def identify(binary: Path) -> BinaryInfo:
    """Run `binary --version`: "Firecracker v1.16.1" (fc-mock adds " (fc-mock)")."""
    result = run([binary, "--version"], timeout=10)
    text = result.stdout.decode(errors="replace").strip()
    match = re.search(r"v?(\d+\.\d+\.\d+\S*)", text)
    if not match:
        raise FcvmError(f"{binary} --version printed {text!r}, not a Firecracker version")
    return BinaryInfo(Path(binary), match.group(1), MOCK_MARKER in text)


def firecracker_version(binary: Path) -> str:
    """"1.16.1" for a binary printing "Firecracker v1.16.1"."""
    return identify(binary).version


def describe_binary(binary: Path) -> str:
    """One line for `fcvm doctor`: "firecracker (fc-mock) 1.16.1 at /usr/local/bin/fcvm-fc-mock"."""
    try:
        info = identify(binary)
    except FcvmError as exc:
        return f"{binary}: not a working Firecracker ({exc})"
    return f"{info.display_name} {info.version} at {binary}"
