from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from dataclasses import fields
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcvm_wire import exec_proto as ep
from fcvm_wire.plan import ImageSpec, NetworkSpec, Plan, PlanError, VolumeSpec
from fcvm_wire.sockets import ShortRead, connect, read_exact

HUGE_DIGITS = "9" * 5000  # past int()'s 4300-digit limit


def _plan() -> Plan:
    return Plan(
        name="web", image=ImageSpec("localhost/web", "/dev/vdb", 4096),
        network=NetworkSpec("172.31.0.2", 30, "172.31.0.1", "06:00:ac:1f:00:02", ["9.9.9.9"]),
        cmd=["httpd", "-f"], env={"A": "1"}, volumes=[VolumeSpec("/www", 5000, True)],
    )


def _plan_dict() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_plan().to_json())
    return data


def test_plan_round_trips_through_json() -> None:
    plan = _plan()
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=99), "plan version 99 is not supported"),
        (lambda d: d.pop("image"), "plan is missing 'image'"),
        (lambda d: d["env"].update({"BAD KEY": "x"}), "env key 'BAD KEY' is not a valid variable name"),
        (lambda d: d["env"].update({"A\n": "x"}), "env key 'A\\\\n' is not a valid variable name"),
        (lambda d: d["volumes"][0].update(guest_path="www"), "must be absolute"),
        (lambda d: d["network"].update(prefix=40), "network.prefix must be 1..32"),
        (lambda d: d["network"].update(prefix=True), "network.prefix must be 1..32"),
        (lambda d: d["image"].update(color="red"), "plan.image has an unknown field 'color'"),
        (lambda d: d.update(color="red"), "plan has an unknown field 'color'"),
        (lambda d: d["cmd"].append("a\0b"), "cmd must be a list"),
    ],
)
def test_a_bad_plan_is_rejected_with_a_message_naming_the_field(mutate: Any, message: str) -> None:
    data = _plan_dict()
    mutate(data)
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


# --- defects: each of these escaped as something other than PlanError, or was accepted ---

def test_a_4300_digit_integer_is_a_plan_error() -> None:
    text = _plan().to_json().replace('"epoch": 0', f'"epoch": {HUGE_DIGITS}')
    assert HUGE_DIGITS in text
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json(text)


@pytest.mark.parametrize("field_name", ["version", "epoch"])
def test_a_huge_integer_value_is_a_plan_error_naming_it_without_printing_it(field_name: str) -> None:
    data = _plan_dict()
    data[field_name] = 10**5000  # repr() of this raises ValueError
    with pytest.raises(PlanError, match=field_name):
        Plan.from_dict(data)


def test_a_non_string_env_key_is_a_plan_error() -> None:
    data = _plan_dict()
    data["env"] = {1: "x"}
    with pytest.raises(PlanError, match="env key 1 is not a valid variable name"):
        Plan.from_dict(data)


def test_a_non_string_guest_path_is_a_plan_error() -> None:
    data = _plan_dict()
    data["volumes"][0]["guest_path"] = 5
    with pytest.raises(PlanError, match="volume path 5 must be absolute"):
        Plan.from_dict(data)


def test_a_string_cmd_is_refused_not_split_into_characters() -> None:
    data = _plan_dict()
    data["cmd"] = "ls"
    with pytest.raises(PlanError, match="cmd must be a list"):
        Plan.from_dict(data)


def test_validate_is_total_on_a_plan_the_host_built_wrongly() -> None:
    plan = _plan()
    plan.volumes = [VolumeSpec(guest_path=None, port=5000)]  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="volume path None must be absolute"):
        plan.validate()


# --- fuzzing from the real field names: mutated values reach validate() ---

_junk_leaf = (
    # A huge int is built by map(): hypothesis would repr() a just(), and repr() refuses past 4300 digits.
    st.none() | st.booleans() | st.integers() | st.just(5000).map(lambda digits: 10**digits)
    | st.integers(min_value=2**63)
    | st.floats() | st.text() | st.sampled_from(["", "ls", "\ud800", "\0", "x\x1b[31m", "/", "A" * 5000])
)
_junk = st.recursive(
    _junk_leaf,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4),
    max_leaves=12,
)

_SHAPE_FIELDS = {"image", "network", "volumes", "version"}
# Every leaf field of the plan, as a path into its JSON document: the fields a mutation leaves the shape of.
LEAF_PATHS: list[tuple[str | int, ...]] = [
    *((f.name,) for f in fields(Plan) if f.name not in _SHAPE_FIELDS),
    *(("image", f.name) for f in fields(ImageSpec)),
    *(("network", f.name) for f in fields(NetworkSpec)),
    *(("volumes", 0, f.name) for f in fields(VolumeSpec)),
]
SHAPE_PATHS: list[tuple[str | int, ...]] = [
    *((name,) for name in sorted(_SHAPE_FIELDS)), ("volumes", 0), ("env", "A"), ("cmd", 0), ("network", "dns"),
]


def _set(data: Any, path: tuple[str | int, ...], value: object) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@given(path=st.sampled_from(LEAF_PATHS), value=_junk)
def test_a_mutated_leaf_value_reaches_validate_and_only_plan_error_escapes(
    path: tuple[str | int, ...], value: object
) -> None:
    data = _plan_dict()
    _set(data, path, value)
    with mock.patch.object(Plan, "validate", autospec=True, side_effect=Plan.validate) as validate:
        with contextlib.suppress(PlanError):
            Plan.from_dict(copy.deepcopy(data))
        assert validate.called, f"a mutated {path} never reached validate()"


@given(
    mutations=st.lists(st.tuples(st.sampled_from(LEAF_PATHS + SHAPE_PATHS), _junk), min_size=1, max_size=4),
    drop=st.sets(st.sampled_from([f.name for f in fields(Plan)])),
    extra=st.dictionaries(st.text(max_size=12), _junk, max_size=2),
)
def test_plan_decoders_raise_only_plan_error(
    mutations: list[tuple[tuple[str | int, ...], object]], drop: set[str], extra: dict[str, object]
) -> None:
    data = _plan_dict()
    for path, value in mutations:
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier mutation removed the parent
            _set(data, path, value)
    for name in drop:
        data.pop(name, None)
    data.update(extra)
    with contextlib.suppress(PlanError):
        Plan.from_dict(copy.deepcopy(data))
    try:
        text = json.dumps(data)
    except ValueError:  # json.dumps itself refuses an integer of more than 4300 digits
        return
    for document in (text, text.replace("5000", HUGE_DIGITS)):
        with contextlib.suppress(PlanError):
            Plan.from_json(document)


@given(st.binary(max_size=200))
def test_plan_decoder_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(PlanError):
        Plan.from_json(data)


def test_deeply_nested_json_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="nested too deeply"):
        Plan.from_json("[" * 100_000)


# --- exec protocol ---

def test_exec_request_and_frames_round_trip() -> None:
    request = ep.ExecRequest(id="abc", argv=["cat", "/etc/hostname"], tty=True, rows=40, cols=100)
    left, right = socket.socketpair()
    left.sendall(request.to_line() + ep.frame(ep.STDIN, b"data") + ep.resize_frame(50, 132) + ep.exit_frame(3))
    left.close()
    assert ep.ExecRequest.from_line(ep.read_line(right)) == request
    assert ep.read_frame(right) == (ep.STDIN, b"data")
    kind, payload = ep.read_frame(right) or (None, b"")
    assert kind == ep.RESIZE and ep.parse_resize(payload) == (50, 132)
    kind, payload = ep.read_frame(right) or (None, b"")
    assert kind == ep.EXIT and ep.parse_exit(payload) == 3
    assert ep.read_frame(right) is None


@pytest.mark.parametrize(
    "line", [b"not json\n", b'{"id": "x", "argv": []}\n', b'{"id": "x", "argv": ["ls"], "target": "host"}\n',
             b'{"id": "x", "argv": ["ls"], "extra": 1}\n', b'{"id": "x", "argv": "ls"}\n',
             b'{"id": "x", "argv": ["ls"], "rows": ' + HUGE_DIGITS.encode() + b"}\n",
             b'{"id": "x", "argv": ["ls"], "rows": 70000}\n', b'{"id": "x", "argv": ["ls"], "env": {"A": 1}}\n',
             b"[" * 100_000],
)
def test_bad_exec_requests_are_refused(line: bytes) -> None:
    with pytest.raises(ep.ExecProtocolError):
        ep.ExecRequest.from_line(line)


@pytest.mark.parametrize("payload", [b"", b"-1", b"256", b"1e3", HUGE_DIGITS.encode(), b"\xff"])
def test_a_bad_exit_frame_is_refused(payload: bytes) -> None:
    with pytest.raises(ep.ExecProtocolError):
        ep.parse_exit(payload)


def test_an_oversized_exec_frame_is_refused() -> None:
    left, right = socket.socketpair()
    left.sendall(bytes([ep.STDOUT]) + (ep.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ep.ExecProtocolError, match="exceeds"):
        ep.read_frame(right)


def test_a_stream_that_ends_inside_a_frame_header_is_an_error_not_a_clean_end() -> None:
    left, right = socket.socketpair()
    left.sendall(bytes([ep.STDOUT, 0]))
    left.close()
    with pytest.raises(ep.ExecProtocolError, match="inside a frame"):
        ep.read_frame(right)


# --- sockets ---

def test_read_exact_gathers_pieces_from_a_socket_and_from_a_file_descriptor() -> None:
    left, right = socket.socketpair()
    with left, right:
        for piece in (b"ab", b"c", b"defg"):
            left.sendall(piece)
        assert read_exact(right, 7) == b"abcdefg"
    r, w = os.pipe()
    try:
        os.write(w, b"xy")
        os.write(w, b"z")
        assert read_exact(r, 3) == b"xyz"
    finally:
        os.close(r)
        os.close(w)


def test_read_exact_says_how_much_arrived_before_the_end() -> None:
    left, right = socket.socketpair()
    left.sendall(b"abc")
    left.close()
    with right, pytest.raises(ShortRead) as caught:
        read_exact(right, 10)
    assert (caught.value.received, caught.value.expected) == (3, 10)


def test_connect_reaches_a_listener_and_closes_its_socket_when_the_connect_fails(tmp_path: Path) -> None:
    path = tmp_path / "listener.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        with connect(path, timeout=5) as client:
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"hi")
                assert read_exact(conn, 2) == b"hi"
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(FileNotFoundError):
            connect(tmp_path / "missing.sock")
    assert len(os.listdir("/proc/self/fd")) == open_before
