"""`fcvm serve` as a user starts it: the settings it prints, the key it makes, a clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fcvm.commands.serve import parse_listen
from fcvm.core.errors import UsageError
from tests.vm.conftest import free_port


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:3000") == ("127.0.0.1", 3000)
    assert parse_listen("[::1]:3001") == ("::1", 3001)
    assert parse_listen("3002") == ("127.0.0.1", 3002)
    for bad in ("127.0.0.1", "host:0", "host:70000", ":x"):
        with pytest.raises(UsageError):
            parse_listen(bad)


def _serve(port: int, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", "fcvm", "serve", "--listen", f"127.0.0.1:{port}"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def test_a_generated_key_is_printed_and_a_chosen_one_never_is(isolated_data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FCVM_API_KEY"}
    port = free_port()
    process, line = _serve(port, env)
    try:
        url = f"http://127.0.0.1:{port}"
        found = re.fullmatch(rf"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY=(e2b_[0-9a-f]{{40}})",
                             line)
        assert found, line
        with httpx.Client(base_url=url) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/v2/sandboxes", headers={"X-API-KEY": found.group(1)}).json() == []
            assert client.get("/v2/sandboxes", headers={"X-API-KEY": "e2b_00"}).status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0

    chosen = "e2b_" + "5" * 40
    process, line = _serve(free_port(), {**env, "FCVM_API_KEY": chosen})
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert line.endswith("E2B_API_KEY=$FCVM_API_KEY") and chosen not in line + stderr


def test_a_port_in_use_is_a_one_line_error(isolated_data_dir: Path) -> None:
    port = free_port()
    first, _ = _serve(port, dict(os.environ))
    try:
        second = subprocess.run([sys.executable, "-m", "fcvm", "serve", "--listen", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert second.stderr.strip().splitlines()[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
