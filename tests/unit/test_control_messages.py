"""The control stream between the guest agent and the host: typed messages, a total decoder, and a host end that a
misbehaving guest cannot kill."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcvm.core.bounded_log import BoundedLog
from fcvm.core.kinds import Health
from fcvm.run.agent_link import MAX_BAD_MESSAGES, AgentLink
from fcvm_wire.control import (
    MAX_LINE,
    MAX_LOG_LINE,
    ContainerState,
    ControlError,
    ControlStream,
    HealthReport,
    HealthState,
    Hello,
    Log,
    LogStream,
    Message,
    PlanMessage,
    Shutdown,
    Status,
    decode,
    log_messages,
)
from fcvm_wire.credential import CREDENTIAL_SIZE
from fcvm_wire.plan import ImageSpec, NetworkSpec, Plan, VolumeSpec

HUGE_DIGITS = "9" * 5000  # past int()'s 4300-digit limit
DEADLINE = 10.0

_text = st.text(st.characters(exclude_categories=["Cs"]))  # lone surrogates are not text
_words = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"))  # argv, env, paths, names
_plans = st.builds(
    Plan,
    name=_words.filter(bool),
    image=st.builds(ImageSpec, ref=st.just("localhost/web"), disk=st.sampled_from(["", "/dev/vdb"]),
                    archive_size=st.integers(0, 2**63 - 1)),
    network=st.just(NetworkSpec("172.31.0.2", 30, "172.31.0.1", "06:00:ac:1f:00:02", ["9.9.9.9"])),
    cmd=st.lists(_words, max_size=4),
    env=st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
                        _words, max_size=3),
    volumes=st.lists(st.builds(VolumeSpec, guest_path=st.just("/data"), port=st.integers(1, 2**32 - 1),
                               read_only=st.booleans()), max_size=2),
    epoch=st.integers(0, 2**63 - 1),
)
_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, agent=_words.filter(lambda s: len(s) <= 64), epoch=st.integers(0, 2**63 - 1)),
    st.builds(PlanMessage, plan=_plans),
    st.builds(Shutdown, timeout=st.integers(0, 3600)),
    st.builds(Status, state=st.sampled_from([ContainerState.STARTING, ContainerState.RUNNING,
                                             ContainerState.FAILED]), detail=_text.filter(lambda s: len(s) <= 8192)),
    st.builds(Status, state=st.just(ContainerState.EXITED), exit_code=st.integers(0, 255), detail=st.just("")),
    st.builds(HealthReport, health=st.sampled_from(HealthState)),
    st.builds(Log, stream=st.sampled_from(LogStream), line=_text),
)


@given(_messages)
def test_every_message_round_trips_through_its_line(message: Message) -> None:
    line = message.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == message


# --- the decoder is total ---

# Stands for an integer literal of 5000 digits, written into the JSON text by hand: json.dumps refuses to.
_HUGE = "<huge integer>"
_junk_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text()
    | st.sampled_from([_HUGE, "", "exited", "stdout", "healthy", "\ud800", "x\x1b[31m", "A" * 70_000])
)
_junk = st.recursive(
    _junk_leaf,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
_TYPES = [cls.TYPE for cls in (Hello, PlanMessage, Shutdown, Status, HealthReport, Log)]


@st.composite
def _mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message's JSON with some of its real fields (or its type) replaced by junk, dropped or added to."""
    message = draw(_messages)
    data: dict[str, Any] = json.loads(message.encode())
    names = ["type", *(f.name for f in fields(type(message)))]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
        action = draw(st.sampled_from(["junk", "drop", "type"]))
        if action == "junk":
            data[name] = draw(_junk)
        elif action == "drop":
            data.pop(name, None)
        else:
            data["type"] = draw(st.sampled_from(_TYPES))  # the right fields for the wrong type
    data.update(draw(st.dictionaries(st.text(max_size=8), _junk, max_size=1)))
    return json.dumps(data).replace(json.dumps(_HUGE), HUGE_DIGITS).encode() + b"\n"


@given(_mutated_messages())
def test_a_mutated_message_decodes_to_a_valid_message_or_raises_control_error(line: bytes) -> None:
    try:
        message = decode(line)
    except ControlError as exc:
        assert str(exc).isprintable()
        return
    assert decode(message.encode()) == message


@given(st.binary(max_size=300))
def test_the_decoder_is_total_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(ControlError):
        decode(data)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"type": "status", "state": "exited", "exit_code": ' + HUGE_DIGITS.encode() + b"}", "not valid JSON"),
        (b'{"type": "status", "state": "exited", "exit_code": true}', "exit_code True is not 0..255"),
        (b'{"type": "status", "state": "exited", "exit_code": 256}', "exit_code 256 is not 0..255"),
        (b'{"type": "status", "state": "exited", "exit_code": -1}', "exit_code -1 is not 0..255"),
        (b'{"type": "status", "state": "exited", "exit_code": "3"}', "exit_code '3' is not 0..255"),
        (b'{"type": "status", "state": "exited"}', "exit_code None is not 0..255"),
        (b'{"type": "status", "state": "running", "exit_code": 0}', "must be null while running"),
        (b'{"type": "status", "state": "done"}', "status.state 'done' is not one of"),
        (b'{"type": "shutdown", "timeout": 3601}', "shutdown.timeout 3601 is not 0..3600"),
        (b'{"type": "shutdown", "timeout": 1.5}', "shutdown.timeout 1.5"),
        (b'{"type": "health", "health": "unknown"}', "health.health 'unknown' is not one of"),
        (b'{"type": "log", "stream": "stdin", "line": "x"}', "log.stream 'stdin' is not one of"),
        (b'{"type": "log", "stream": "stdout", "line": "\\ud800"}', "log.line must be text"),
        (b'{"type": "log", "stream": "stdout", "line": "' + b"x" * (MAX_LOG_LINE + 1) + b'"}', "log.line"),
        (b'{"type": "log", "stream": "stdout", "line": "x", "color": 1}', "log message has an unknown field"),
        (b'{"type": "hello", "agent": "1"}', "hello message is missing 'epoch'"),
        (b'{"type": "plan", "plan": {"version": 1}}', "bad plan: plan is missing"),
        (b'{"type": "reboot"}', "unknown control message type 'reboot'"),
        (b'{"type": 7}', "unknown control message type 7"),
        (b"[]", "must be a JSON object"),
        (b"[" * 100_000, "nested too deeply"),
        (b"\xff\n", "not valid JSON"),
    ],
    ids=lambda value: repr(value[:60]) if isinstance(value, bytes) else None,
)
def test_a_bad_message_raises_control_error_naming_the_field(line: bytes, error: str) -> None:
    with pytest.raises(ControlError, match=error):
        decode(line)


def test_an_error_escapes_the_guest_text_it_quotes() -> None:
    with pytest.raises(ControlError) as caught:
        decode(b'{"type": "\\u001b]0;owned\\u0007\\n2024 fake log line"}')
    assert str(caught.value).isprintable() and "\x1b" not in str(caught.value)


def test_a_long_line_of_output_travels_as_several_log_messages() -> None:
    line = "x" * (2 * MAX_LOG_LINE + 5)
    messages = log_messages(LogStream.STDOUT, line)
    assert [len(m.line) for m in messages] == [MAX_LOG_LINE, MAX_LOG_LINE, 5]
    assert "".join(m.line for m in messages) == line
    assert log_messages(LogStream.STDERR, "") == [Log(LogStream.STDERR, "")]
    assert log_messages(LogStream.AGENT, "bad name \udcff") == [Log(LogStream.AGENT, "bad name \\udcff")]


# --- the stream ---

def test_control_stream_carries_messages_and_survives_a_bad_line() -> None:
    left, right = socket.socketpair()
    a, b = ControlStream(left), ControlStream(right)

    def write() -> None:  # more than the socket buffer holds: it needs a reader at the same time
        a.send(Log(LogStream.STDOUT, "hello\nworld"))
        left.sendall(b'{"type": "status", "state": "exited", "exit_code": null}\n')
        left.sendall(b"x" * (MAX_LINE + 10) + b"\n")
        a.send(Status(ContainerState.EXITED, 3))
        left.sendall(b'{"type": "health"')
        a.close()

    threading.Thread(target=write, daemon=True).start()
    assert b.receive() == Log(LogStream.STDOUT, "hello\nworld")
    with pytest.raises(ControlError, match="exit_code"):
        b.receive()
    with pytest.raises(ControlError, match="longer than"):
        b.receive()
    assert b.receive() == Status(ContainerState.EXITED, 3)
    with pytest.raises(ControlError, match="ended inside a line"):
        b.receive()
    assert b.receive() is None


# --- the host end: AgentLink, attacked from the guest's side with raw lines ---

class _Host:
    def __init__(self, link: AgentLink, socket_path: Path, stages: list[str], health: list[Health]) -> None:
        self.link, self.socket_path, self.stages, self.health = link, socket_path, stages, health

    def guest(self) -> socket.socket:
        """A connection as the agent makes it: the VM's credential first."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        sock.sendall(CREDENTIAL)
        return sock


CREDENTIAL = bytes(range(CREDENTIAL_SIZE))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[_Host]:
    """An AgentLink serving a control socket, with a hook that fails the test if any thread dies of an exception."""
    died: list[BaseException | None] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value)
    stages: list[str] = []
    health: list[Health] = []
    link = AgentLink(
        plan=Plan(name="web", image=ImageSpec("localhost/web"),
                  network=NetworkSpec("172.31.0.2", 30, "172.31.0.1", "06:00:ac:1f:00:02")),
        prepare=None, restored=False, credential=CREDENTIAL, container_log=BoundedLog(tmp_path / "container.log"),
        echo_output=False, agent_reports_health=True,
        on_stage=stages.append, on_health=health.append, logger=logging.getLogger("fcvm.test.agent_link"),
    )
    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    stop = threading.Event()
    link.accept_forever(listener, stop)
    try:
        yield _Host(link, path, stages, health)
    finally:
        stop.set()
        listener.close()
        threading.excepthook = previous_hook
    assert died == [], f"a host thread died: {died!r}"


def _wait(condition: Any) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize(
    "bad_exit_code", [b"null", b'"x"', b"true", b"300", b"-1", b"1.5", b"[1]", HUGE_DIGITS.encode(),
                      b'"' + HUGE_DIGITS.encode() + b'"', b"1e400"],
    ids=lambda value: repr(value[:10]),
)
def test_a_bad_exit_code_neither_kills_the_host_thread_nor_becomes_the_vm_s_exit_code(
    host: _Host, bad_exit_code: bytes
) -> None:
    with host.guest() as guest:
        guest.sendall(b'{"type": "status", "state": "running"}\n')
        guest.sendall(b'{"type": "status", "state": "exited", "exit_code": ' + bad_exit_code + b"}\n")
        guest.sendall(b'{"type": "health", "health": "healthy"}\n')
        _wait(lambda: host.health)
        assert host.health == [Health.HEALTHY], "the host stopped reading after the bad status"
        assert host.link.container_running.is_set()
        assert host.link.exit_code is None and not host.link.container_done.is_set()
        guest.sendall(b'{"type": "status", "state": "exited", "exit_code": 3}\n')
        _wait(host.link.container_done.is_set)
    assert host.link.exit_code == 3


def test_the_first_exit_code_stands(host: _Host) -> None:
    with host.guest() as guest:
        guest.sendall(b'{"type": "status", "state": "exited", "exit_code": 3}\n')
        guest.sendall(b'{"type": "status", "state": "exited", "exit_code": 0}\n')
        guest.sendall(b'{"type": "status", "state": "failed", "detail": "later"}\n')
        guest.sendall(b'{"type": "health", "health": "unhealthy"}\n')
        _wait(lambda: host.health)
    assert host.link.exit_code == 3 and host.link.failure is None


def test_the_host_sends_the_plan_once_the_agent_is_prepared_and_escapes_what_the_guest_logs(
    host: _Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fcvm.test.agent_link")
    plan = host.link.plan
    assert plan is not None
    with host.guest() as guest:
        replies = guest.makefile("rb")
        guest.sendall(b'{"type": "hello", "agent": "1", "epoch": 0}\n')
        guest.sendall(b'{"type": "status", "state": "prepared", "exit_code": null, "detail": ""}\n')
        assert decode(replies.readline()) == PlanMessage(plan)
        guest.sendall(b'{"type": "log", "stream": "agent", "line": "\\u001b[2J\\nfcvm: forged line"}\n')
        guest.sendall(b'{"type": "status", "state": "failed", "detail": "\\u001b]0;title\\u0007boom"}\n')
        _wait(host.link.container_done.is_set)
    assert host.stages == ["agent_connected", "prepared"]
    agent_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent: ")]
    assert agent_lines == ["agent: \\x1b[2J\\nfcvm: forged line"]
    assert host.link.failure == "\\x1b]0;title\\x07boom"


def test_a_guest_that_keeps_sending_garbage_is_cut_off(host: _Host) -> None:
    with host.guest() as guest:
        guest.sendall(b"garbage\n" * MAX_BAD_MESSAGES)
        guest.settimeout(DEADLINE)
        assert guest.recv(1) == b"", "the host kept the connection open"
