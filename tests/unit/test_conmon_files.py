"""The agent reads the container's output and exit code from what conmon writes (k8s-file log, exit file)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from fc_agent import conmon
from fcvm.core.wait import wait_until
from fcvm_wire.control import MAX_LOG_LINE, LogStream

pytestmark = pytest.mark.unit
ID = "c0ffee"


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("_RUN_ROOT", "_GRAPH_ROOT", "_EXIT_DIR"):
        monkeypatch.setattr(conmon, name, tmp_path / name)
    (tmp_path / "_GRAPH_ROOT" / ID / "userdata").mkdir(parents=True)
    (tmp_path / "_RUN_ROOT" / ID / "userdata").mkdir(parents=True)
    (tmp_path / "_EXIT_DIR").mkdir()
    return tmp_path


def test_the_log_is_followed_until_the_container_ended_and_partial_lines_are_joined(roots: Path) -> None:
    log = roots / "_GRAPH_ROOT" / ID / "userdata" / "ctr.log"
    log.write_bytes(b"2026-12-03T16:19:07.9+00:00 stdout F hello world\n"
                    b"2026-12-03T16:19:07.9+00:00 stderr P to-\n")
    lines: list[tuple[LogStream, str]] = []
    ended = threading.Event()
    follower = threading.Thread(target=conmon.follow_log, args=(ID, lambda s, t: lines.append((s, t)), ended))
    follower.start()
    assert wait_until(lambda: lines, 10), "the follower never read the log's first line"
    with log.open("ab") as f:  # written while followed, the last of it just before conmon exits
        f.write(b"2026-12-03T16:19:08.0+00:00 stderr F stderr\n2026-12-03T16:19:08.0+00:00 stdout F \n"
                b"2026-12-03T16:19:08.1+00:00 stdout P " + b"x" * MAX_LOG_LINE + b"\n")
    ended.set()
    follower.join(timeout=10)
    assert not follower.is_alive()
    assert lines == [(LogStream.STDOUT, "hello world"), (LogStream.STDERR, "to-stderr"), (LogStream.STDOUT, ""),
                     (LogStream.STDOUT, "x" * MAX_LOG_LINE)]


def test_the_exit_code_is_conmons_once_conmon_has_exited(roots: Path) -> None:
    monitor = subprocess.Popen(["sleep", "0.5"])
    (roots / "_RUN_ROOT" / ID / "userdata" / "conmon.pid").write_text(str(monitor.pid))
    (roots / "_EXIT_DIR" / ID).write_text("137")
    assert conmon.wait_for_exit(ID) == 137
    assert monitor.poll() == 0, "returned before conmon exited"


@pytest.mark.parametrize("content", [None, "", "oops", "300"])
def test_no_usable_exit_file_means_unknown(roots: Path, content: str | None) -> None:
    (roots / "_RUN_ROOT" / ID / "userdata" / "conmon.pid").write_text(str(os.getpid() + 10**6))  # no such process
    if content is not None:
        (roots / "_EXIT_DIR" / ID).write_text(content)
    assert conmon.wait_for_exit(ID) is None
