"""`fcvm podman run -p` on a host port that is already taken fails before anything is created."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from tests.hoststate import HostState
from tests.support import require_root


def test_a_host_port_in_use_is_refused_and_nothing_is_left() -> None:
    require_root()
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        before = HostState.capture()
        result = subprocess.run([sys.executable, "-m", "fcvm", "podman", "run", "--network", "bridged", "-p",
                                 f"{port}:80", "localhost/fcvm-demo-httpd"], capture_output=True, text=True,
                                timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"host port {port}/tcp is already in use" in lines[0], result.stderr
    assert HostState.capture().diff(before) == {}
    rows = subprocess.run([sys.executable, "-m", "fcvm", "ls", "-a", "--json"], capture_output=True, text=True,
                          check=True).stdout
    assert json.loads(rows) == []
