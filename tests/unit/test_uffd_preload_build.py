"""The UFFD preload library's build (content-addressed), its environment, and its start-up checks.

Loading the library into a process that maps no guest RAM needs neither root nor userfaultfd.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fcvm.core.proc import CommandError
from fcvm.uffd import preload
from tests.support import require_tool


@pytest.fixture(autouse=True)
def _compiler() -> None:
    require_tool("cc")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preload.build(tmp_path_factory.mktemp("preload"))


def test_build_is_content_addressed(tmp_path: Path) -> None:
    first = preload.build(tmp_path)
    before = first.stat()
    assert first.name.startswith("libfcvm-uffd-") and first.suffix == ".so"
    assert len(first.name) == len("libfcvm-uffd-.so") + 16

    again = preload.build(tmp_path)
    assert again == first
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "rebuilt"

    changed_source = tmp_path / "src" / "uffd_preload.c"
    changed_source.parent.mkdir()
    changed_source.write_bytes(preload.SOURCE.read_bytes() + b"/* changed */\n")
    changed = preload.build(tmp_path, changed_source)
    assert changed != first
    assert changed.parent == tmp_path and first.exists()
    assert sorted(p.name for p in tmp_path.glob("*.so*")) == sorted([first.name, changed.name]), "temp files left"


def test_find_looks_for_the_current_build_only(tmp_path: Path) -> None:
    empty, built = tmp_path / "empty", tmp_path / "built"
    empty.mkdir()
    assert preload.find([empty, built]) is None
    library = preload.build(built)
    assert preload.find([empty, built]) == library
    stale = built / "libfcvm-uffd-0000000000000000.so"
    library.rename(stale)
    assert preload.find([empty, built]) is None


def test_a_compile_error_leaves_nothing_behind(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int unused(void) { int x; return 0; }\n")  # -Wall -Werror: unused variable
    out = tmp_path / "out"
    with pytest.raises(CommandError, match="unused variable"):
        preload.build(out, broken)
    assert list(out.iterdir()) == []


def test_env_for(tmp_path: Path, library: Path) -> None:
    env = preload.env_for(tmp_path / "uffd.sock", 64 << 20, library)
    assert env == {"LD_PRELOAD": str(library), "FCVM_UFFD_SOCKET": str(tmp_path / "uffd.sock"),
                   "FCVM_UFFD_MEM_SIZE": str(64 << 20)}
    with pytest.raises(ValueError, match="page size"):
        preload.env_for(tmp_path / "uffd.sock", 1000, library)
    with pytest.raises(ValueError, match="longer than"):
        preload.env_for(tmp_path / ("s" * 120), 64 << 20, library)
    with pytest.raises(ValueError, match="spaces or colons"):
        preload.env_for(tmp_path / "uffd.sock", 64 << 20, tmp_path / "a b.so")


def _run_preloaded(library: Path, env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FCVM_UFFD_")}
    return subprocess.run(["sh", "-c", command], env={**clean, "LD_PRELOAD": str(library), **env},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("socket", "size", "complaint"),
    [("s", "", "FCVM_UFFD_MEM_SIZE"), ("s", "abc", "FCVM_UFFD_MEM_SIZE"), ("s", "1000", "FCVM_UFFD_MEM_SIZE"),
     ("s", "0", "FCVM_UFFD_MEM_SIZE"), ("s", "4096x", "FCVM_UFFD_MEM_SIZE"), ("s" * 108, "4096", "FCVM_UFFD_SOCKET"),
     ("", "4096", "FCVM_UFFD_SOCKET")],
)
def test_bad_configuration_stops_the_process_at_load(library: Path, socket: str, size: str, complaint: str) -> None:
    result = _run_preloaded(library, {"FCVM_UFFD_SOCKET": socket, "FCVM_UFFD_MEM_SIZE": size}, "true")
    assert result.returncode == 1
    assert result.stderr.startswith(f"fcvm-uffd-preload: {complaint} must be")
    assert result.stderr.count("\n") == 1


def test_children_do_not_inherit_the_configuration(library: Path, tmp_path: Path) -> None:
    # QEMU runs helpers such as `exec:cat` for migrate-incoming; they must never act on the variables.
    env = {"FCVM_UFFD_SOCKET": str(tmp_path / "s"), "FCVM_UFFD_MEM_SIZE": str(64 << 20)}
    result = _run_preloaded(library, env, 'echo "${FCVM_UFFD_SOCKET-unset} ${FCVM_UFFD_MEM_SIZE-unset}"')
    assert (result.returncode, result.stdout, result.stderr) == (0, "unset unset\n", "")


def test_env_for_a_connection_and_a_device_handed_over(library: Path) -> None:
    env = preload.env_for(5, 64 << 20, library, device_fd=6)
    assert env == {"LD_PRELOAD": str(library), "FCVM_UFFD_SOCKET_FD": "5", "FCVM_UFFD_DEV_FD": "6",
                   "FCVM_UFFD_MEM_SIZE": str(64 << 20)}


@pytest.mark.parametrize(("variable", "value"), [("FCVM_UFFD_SOCKET_FD", "x"), ("FCVM_UFFD_SOCKET_FD", "99"),
                                                 ("FCVM_UFFD_DEV_FD", "-1"), ("FCVM_UFFD_DEV_FD", "99")])
def test_an_inherited_fd_that_is_not_open_stops_the_process_at_load(library: Path, variable: str, value: str) -> None:
    # The connection on stdin is open; the variable under test names no open fd.
    env = {"FCVM_UFFD_SOCKET_FD": "0", "FCVM_UFFD_MEM_SIZE": "4096", variable: value}
    result = _run_preloaded(library, env, "true")
    assert result.returncode == 1
    assert result.stderr.startswith(f"fcvm-uffd-preload: {variable} must be an open file descriptor")
    assert result.stderr.count("\n") == 1
