"""The host side of the agent's channel, attacked from the guest's side with raw clients: only connections that
start with the VM's credential are heard (control port and volume ports), guest output on a terminal is shown and
never obeyed, and container.log stays bounded."""

from __future__ import annotations

import logging
import os
import pty
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from fcvm.core.bounded_log import BoundedLog
from fcvm.core.kinds import Health
from fcvm.core.terminal import TerminalWriter, neutralise
from fcvm.core.wait import wait_until
from fcvm.fusepipe import Server
from fcvm.run.agent_gate import LOGGED_REFUSALS, AgentGate
from fcvm.run.agent_link import AgentLink, start_thread
from fcvm.run.container_log import log_files
from fcvm_wire import credential as credential_wire
from fcvm_wire.control import ContainerState, Hello, Log, LogStream, Status
from fcvm_wire.fusepipe import proto
from fcvm_wire.sockets import connect

FORGED_EXIT = b'{"type":"status","state":"exited","exit_code":0}\n'
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\x1b[0m \x9b6n bell\x07"


def wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the other end closed the connection without sending anything."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "v.sock_1000"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    yield sock, path
    sock.close()


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, Captured]]:
    logger = logging.getLogger(f"fcvm.test.{secrets.token_hex(4)}")
    handler = Captured()
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)


# --- the gate --------------------------------------------------------------------------------------


def test_gate_passes_only_the_credential_and_keeps_the_bytes_after_it(
        listener: tuple[socket.socket, Path], captured: tuple[logging.Logger, Captured]) -> None:
    sock, path = listener
    logger, log = captured
    credential = secrets.token_bytes(credential_wire.CREDENTIAL_SIZE)
    gate = AgentGate(sock, credential, name="control port", logger=logger, timeout=0.5)
    gate.settimeout(5.0)
    silent = connect(path)  # says nothing: must not hold up the others
    with connect(path) as forger, connect(path) as wrong, connect(path) as agent:
        forger.sendall(FORGED_EXIT)
        wrong.sendall(secrets.token_bytes(credential_wire.CREDENTIAL_SIZE) + b"hello\n")
        agent.sendall(credential + b"hello\n")
        conn, _ = gate.accept()
        with conn:
            assert conn.recv(64) == b"hello\n"
        assert closed_by_peer(forger) and closed_by_peer(wrong)
        assert closed_by_peer(silent)  # after the check's timeout
    silent.close()
    with pytest.raises(TimeoutError):  # nothing else got through
        gate.settimeout(0.2)
        gate.accept()
    refusals = [line for line in log.lines if "refused a connection without the agent's credential" in line]
    assert len(refusals) == 3 and any("wrong credential" in line for line in refusals)
    gate.close()
    with pytest.raises(OSError):
        gate.accept()


def test_a_flood_of_refusals_is_counted_not_logged_line_by_line(
        listener: tuple[socket.socket, Path], captured: tuple[logging.Logger, Captured]) -> None:
    sock, path = listener
    logger, log = captured
    gate = AgentGate(sock, secrets.token_bytes(credential_wire.CREDENTIAL_SIZE), name="control port",
                     logger=logger)
    for _ in range(LOGGED_REFUSALS * 3):
        with connect(path) as forger:
            forger.sendall(FORGED_EXIT)
            assert closed_by_peer(forger)
    wait_for(lambda: gate.refused == LOGGED_REFUSALS * 3, "every refusal")
    assert len(log.lines) == LOGGED_REFUSALS
    gate.close()


# --- the control port: AgentLink -------------------------------------------------------------------


class Link:
    """An AgentLink serving a control listener, as the supervisor runs it."""

    def __init__(self, sock: socket.socket, path: Path, logger: logging.Logger, container_log: BoundedLog,
                 *, echo_output: bool = False) -> None:
        self.path = path
        self.credential = secrets.token_bytes(credential_wire.CREDENTIAL_SIZE)
        self.stages: list[str] = []
        self.health: list[Health] = []
        self.stop = threading.Event()
        self.agent = AgentLink(plan=None, prepare=None, restored=False, credential=self.credential,
                               container_log=container_log, echo_output=echo_output, agent_reports_health=True,
                               on_stage=self.stages.append, on_health=self.health.append, logger=logger)
        self.agent.accept_forever(sock, self.stop)

    def agent_stream(self) -> socket.socket:
        return credential_wire.present(connect(self.path), self.credential)


def test_a_forged_status_without_the_credential_changes_nothing(
        listener: tuple[socket.socket, Path], captured: tuple[logging.Logger, Captured], tmp_path: Path) -> None:
    sock, path = listener
    logger, log = captured
    link = Link(sock, path, logger, BoundedLog(tmp_path / "container.log"))
    with connect(path) as forger:
        forger.sendall(Hello("1", 0).encode() + FORGED_EXIT + b'{"type":"health","health":"healthy"}\n')
        assert closed_by_peer(forger)
    assert link.agent.exit_code is None and not link.agent.container_done.is_set()
    assert link.stages == [] and link.health == []
    assert wait_until(lambda: any("refused a connection without the agent's credential" in line
                                  for line in log.lines), 30)

    with link.agent_stream() as agent:  # the same bytes from the agent are heard
        agent.sendall(Hello("1", 0).encode() + FORGED_EXIT)
        wait_for(link.agent.container_done.is_set, "the agent's exit status")
    assert link.agent.exit_code == 0 and link.stages == ["agent_connected"]
    link.stop.set()


def test_container_log_rotates_at_its_bound_and_logs_reads_both_in_order(
        listener: tuple[socket.socket, Path], captured: tuple[logging.Logger, Captured], tmp_path: Path) -> None:
    sock, path = listener
    logger, _ = captured
    bound = 4096
    link = Link(sock, path, logger, BoundedLog(tmp_path / "container.log", max_bytes=bound))
    lines = [f"line {i:04d} " + "x" * 90 for i in range(200)]  # 100 bytes each: 20000 bytes in all
    with link.agent_stream() as agent:
        agent.sendall(b"".join(Log(LogStream.STDOUT, line).encode() for line in lines)
                      + Status(ContainerState.EXITED, 0).encode())
        wait_for(link.agent.container_done.is_set, "the exit status after the output")
    files = log_files(tmp_path)
    assert [f.name for f in files] == ["container.log.1", "container.log"]
    assert all(f.stat().st_size <= bound for f in files)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    kept = b"".join(f.read_bytes() for f in files).decode().splitlines()
    assert kept == lines[-len(kept):] and len(kept) > bound // 100  # the newest lines, in order, none cut
    link.stop.set()


# --- guest text on a terminal ----------------------------------------------------------------------


def test_neutralise_shows_control_sequences_and_keeps_text() -> None:
    assert neutralise(ESCAPES) == "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred\\x1b[0m \\x9b6n bell\\x07"
    plain = "héllo wörld\tcolumn ✓ 中文\r\nnext line\n"
    assert neutralise(plain) == plain
    assert neutralise("progress 10%\rprogress 20%") == "progress 10%\\x0dprogress 20%"
    writer = TerminalWriter()  # UTF-8 split across chunks
    data = "é\x1b[2J".encode()
    assert writer.text(data[:1]) + writer.text(data[1:], final=True) == "é\\x1b[2J"


def echo(link: Link, line: str) -> None:
    with link.agent_stream() as agent:
        agent.sendall(Log(LogStream.STDOUT, line).encode() + Status(ContainerState.EXITED, 0).encode())
        wait_for(link.agent.container_done.is_set, "the echoed line")


def test_container_output_is_neutralised_on_a_terminal_and_passed_through_otherwise(
        listener: tuple[socket.socket, Path], captured: tuple[logging.Logger, Captured], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    logger, _ = captured
    main, secondary = pty.openpty()
    terminal = os.fdopen(secondary, "w", encoding="utf-8")
    monkeypatch.setattr("sys.stdout", terminal)
    link = Link(sock, path, logger, BoundedLog(tmp_path / "container.log"), echo_output=True)
    echo(link, ESCAPES)
    shown = os.read(main, 4096)
    assert b"\x1b" not in shown and b"\x07" not in shown and b"\\x1b]0;owned" in shown
    assert (tmp_path / "container.log").read_text() == ESCAPES + "\n"  # the log keeps what the container wrote
    terminal.close()
    os.close(main)

    read_end, write_end = os.pipe()
    piped = os.fdopen(write_end, "w", encoding="utf-8")
    monkeypatch.setattr("sys.stdout", piped)
    sock2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock2.bind(str(tmp_path / "v.sock_1000b"))
    sock2.listen(4)
    link = Link(sock2, tmp_path / "v.sock_1000b", logger, BoundedLog(tmp_path / "other.log"), echo_output=True)
    echo(link, ESCAPES)
    piped.close()
    assert os.read(read_end, 4096) == (ESCAPES + "\n").encode()  # not a terminal: unchanged, as podman
    os.close(read_end)
    sock2.close()


# --- a volume port: the fuse-pipe server behind the gate -------------------------------------------


def test_a_volume_server_sees_only_the_agent(listener: tuple[socket.socket, Path],
                                             captured: tuple[logging.Logger, Captured], tmp_path: Path) -> None:
    sock, path = listener
    logger, log = captured
    shared = tmp_path / "shared"
    shared.mkdir()
    credential = secrets.token_bytes(credential_wire.CREDENTIAL_SIZE)
    server = Server(str(shared))
    start_thread(server.serve_forever, cast(socket.socket, AgentGate(sock, credential, name="volume port 5000",
                                                                     logger=logger)))
    hello = proto.HELLO.pack(proto.MAGIC, 7, 0, 0)
    try:
        with connect(path) as raw:
            raw.sendall(hello)
            assert closed_by_peer(raw)
        # The gate logs the refusal right after closing the connection: poll for it.
        assert wait_until(lambda: any("volume port 5000: refused" in line for line in log.lines), 30)
        with credential_wire.present(connect(path), credential) as relay:
            relay.sendall(hello)
            relay.settimeout(10)
            magic, status, _ = proto.HELLO_OK.unpack(relay.recv(proto.HELLO_OK.size, socket.MSG_WAITALL))
            assert (magic, status) == (proto.MAGIC, 0)
    finally:
        server.close()


# --- snapshots: a clone's host side must know its agent's credential -------------------------------


def test_a_snapshot_description_without_the_agent_credential_is_refused(tmp_path: Path) -> None:
    from fcvm.core.kinds import NetworkMode, VmmKind
    from fcvm.snapshot.description import DriveRecord, SnapshotDescription, SnapshotError

    credential = secrets.token_bytes(credential_wire.CREDENTIAL_SIZE)
    description = SnapshotDescription(
        hypervisor=VmmKind.QEMU, vmm_version="8.2.0", vcpus=1, mem_mib=512,
        drives=(DriveRecord("rootfs", False, True, "rootfs.img"),), guest_mac="06:00:ac:10:00:02", tap="tap0",
        image="localhost/web", network_mode=NetworkMode.BRIDGED, source_vm="web", agent_credential=credential.hex())
    description.write(tmp_path)
    assert credential_wire.from_hex(SnapshotDescription.read(tmp_path).agent_credential) == credential

    for bad in ("", "zz" * 32, credential.hex()[:-2]):
        SnapshotDescription(**{**description.__dict__, "agent_credential": bad}).write(tmp_path)
        with pytest.raises(SnapshotError, match="agent credential"):
            SnapshotDescription.read(tmp_path)
