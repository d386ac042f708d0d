"""The agent's exec through crun: the container's process with the request's command, and podman's exit codes."""

from __future__ import annotations

import pytest

from fc_agent import oci_exec
from fcvm_wire import exec_proto as ep

pytestmark = pytest.mark.unit

CONTAINER_CONFIG: dict[str, object] = {
    "process": {
        "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
        "args": ["httpd", "-f"],
        "env": ["PATH=/usr/bin:/bin", "TERM=xterm", "GREETING=container"],
        "cwd": "/www",
        "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }
}


def test_the_command_runs_as_the_container_runs_with_the_request_env_on_top() -> None:
    request = ep.ExecRequest(id="1", argv=["sh", "-c", "id"], env={"GREETING": "exec", "EXTRA": "1"})
    spec = oci_exec.process_spec(CONTAINER_CONFIG, request)
    assert spec["args"] == ["sh", "-c", "id"]
    assert spec["env"] == ["PATH=/usr/bin:/bin", "TERM=xterm", "GREETING=exec", "EXTRA=1"]
    assert spec["terminal"] is False and "consoleSize" not in spec
    container_process = CONTAINER_CONFIG["process"]
    assert isinstance(container_process, dict)
    for key in ("user", "cwd", "capabilities", "rlimits", "noNewPrivileges"):
        assert spec[key] == container_process[key], key


def test_a_terminal_is_created_at_the_callers_size() -> None:
    spec = oci_exec.process_spec(CONTAINER_CONFIG, ep.ExecRequest(id="1", argv=["sh"], tty=True, rows=33, cols=101))
    assert spec["terminal"] is True and spec["consoleSize"] == {"height": 33, "width": 101}


def test_a_config_without_a_process_is_refused() -> None:
    with pytest.raises(oci_exec.ExecUnavailable, match="no process"):
        oci_exec.process_spec({}, ep.ExecRequest(id="1", argv=["sh"]))


@pytest.mark.parametrize(("returncode", "crun_log", "expected"), [
    (0, "", 0),
    (7, "", 7),
    (255, "", 255),  # the command's own 255: crun logged nothing
    (255, "executable file `nope` not found in $PATH: No such file or directory\n", 127),
    (255, "open executable: Permission denied\n", 126),
    (255, "open executable: Operation not permitted\n", 126),
    (255, "container `abc` is not running\n", 125),
])
def test_crun_failures_answer_podmans_exit_codes(returncode: int, crun_log: str, expected: int) -> None:
    assert oci_exec.exit_code(returncode, crun_log) == expected
