"""The agent's channel belongs to the agent, attacked from the container and from raw clients on the host side.

- As root in the container, no AF_VSOCK socket can be created (podman's seccomp profile would allow one), by any
  route: the plain call, the family with high bits set, the 32-bit ABI; other sockets still work.
- A connection to a host-side listener (control port `<uds>_1000`, volume port `<uds>_5000`) without the agent's
  credential is closed unheard and logged: a forged exit status changes nothing in `fcvm ls`, and raw FUSE never
  reaches the volume server.
- Under Firecracker, MMDS (which the container can read) holds no credential.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

from fcvm.core import paths
from fcvm.state import Store
from fcvm_wire import ports
from fcvm_wire.fusepipe import proto
from fcvm_wire.sockets import connect
from tests.hoststate import HostState
from tests.vm.support import fcvm, hypervisor_env, vm_row
from tests.vsock_probes import write_probes

FORGED_EXIT = b'{"type":"status","state":"exited","exit_code":0}\n'
REFUSED = "refused a connection without the agent's credential"


def closed_unheard(sock: socket.socket) -> bool:
    """The host closed the connection without answering (after its credential timeout at most)."""
    sock.settimeout(30)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def forge_exit_status(row: dict[str, Any]) -> None:
    """What a container process with a vsock socket would send the host's control listener."""
    with connect(f"{row['config']['vsock_uds']}_{ports.HOST_CONTROL}") as forger:
        forger.sendall(b'{"type":"hello","agent":"1","epoch":0}\n' + FORGED_EXIT)
        assert closed_unheard(forger)


def supervisor_log(name: str) -> str:
    return (paths.vm_logs_dir(str(vm_row(name)["id"])) / "supervisor.log").read_text()


def test_the_container_cannot_reach_the_host_and_raw_clients_are_refused(guest_assets: None,
                                                                         tmp_path: Path) -> None:
    probes = tmp_path / "probes"
    probes.mkdir()
    write_probes(probes)
    before = HostState.capture()
    fcvm("podman", "run", "-d", "--name", "sec", "--map", f"{probes}:/probe:ro", "localhost/fcvm-busybox",
         "sleep", "3600")
    try:
        codes = {name: fcvm("exec", "sec", "--", f"/probe/{name}", check=False).returncode
                 for name in ("vsock", "vsock-high-bits", "vsock-i386", "vsock-socketcall", "unix")}
        killed = 128 + signal.SIGSYS  # as podman reports a process killed by a signal
        assert codes == {"vsock": 1, "vsock-high-bits": 38, "vsock-i386": killed, "vsock-socketcall": killed,
                         "unix": 0}, codes

        row = vm_row("sec")
        forge_exit_status(row)
        with connect(f"{row['config']['vsock_uds']}_{ports.HOST_VOLUME_BASE}") as raw_fuse:
            raw_fuse.sendall(proto.HELLO.pack(proto.MAGIC, 1, 0, 0))
            assert closed_unheard(raw_fuse)

        row = vm_row("sec")
        assert row["status"] == "running" and row["exit_code"] is None
        assert fcvm("exec", "sec", "--", "echo", "still here").stdout == "still here\n"
        log = supervisor_log("sec")
        assert f"control port: {REFUSED}" in log and f"volume port {ports.HOST_VOLUME_BASE}: {REFUSED}" in log
    finally:
        fcvm("stop", "sec")
    assert HostState.capture().diff(before) == {}


MMDS_READ = (
    "token=$(printf 'PUT /latest/api/token HTTP/1.0\\r\\nX-metadata-token-ttl-seconds: 60\\r\\n\\r\\n'"
    " | nc -w 5 169.254.169.254 80 | tail -n 1); "
    "printf 'GET / HTTP/1.0\\r\\nX-metadata-token: %s\\r\\nAccept: application/json\\r\\n\\r\\n' \"$token\""
    " | nc -w 5 169.254.169.254 80"
)


def test_mmds_holds_no_credential_and_a_forged_status_changes_nothing_under_firecracker(guest_assets: None) -> None:
    env = hypervisor_env("firecracker")
    before = HostState.capture()
    fcvm("podman", "run", "-d", "--name", "fcsec", "--hypervisor", "firecracker", "localhost/fcvm-busybox",
         "sleep", "3600", env=env)
    try:
        row = vm_row("fcsec")
        assert row["config"]["machine"]["agent_credential"] == "<redacted>"  # `ls --json` never shows it
        credential = Store().require_vm("fcsec").config["machine"]["agent_credential"]
        assert isinstance(credential, str) and len(credential) == 64
        # What the container reads from MMDS: the prepare plan (so MMDS answered), and nothing of the credential.
        answer = fcvm("exec", "fcsec", "--", "sh", "-c", MMDS_READ, env=env).stdout
        document = json.loads(answer[answer.index("{"):])
        assert document["name"] == "prestart"
        assert credential not in answer and credential.upper() not in answer

        forge_exit_status(row)
        row = vm_row("fcsec")
        assert row["status"] == "running" and row["exit_code"] is None
        assert f"control port: {REFUSED}" in supervisor_log("fcsec")
    finally:
        fcvm("stop", "fcsec", env=env)
    assert HostState.capture().diff(before) == {}
