from __future__ import annotations

import contextlib
import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcvm_wire import exec_proto as ep
from fcvm_wire.control import ControlError, ControlStream, decode, encode
from fcvm_wire.plan import ImageSpec, NetworkSpec, Plan, PlanError, VolumeSpec


def _plan() -> Plan:
    return Plan(
        name="web", image=ImageSpec("localhost/web", "/dev/vdb", 4096),
        network=NetworkSpec("172.31.0.2", 30, "172.31.0.1", "06:00:ac:1f:00:02", ["9.9.9.9"]),
        cmd=["httpd", "-f"], env={"A": "1"}, volumes=[VolumeSpec("/www", 5000, True)],
    )


def test_plan_round_trips_through_json() -> None:
    plan = _plan()
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=99), "plan version 99 is not supported"),
        (lambda d: d.pop("image"), "plan is missing 'image'"),
        (lambda d: d["env"].update({"BAD KEY": "x"}), "env key 'BAD KEY' is not a valid variable name"),
        (lambda d: d["volumes"][0].update(guest_path="www"), "must be absolute"),
        (lambda d: d["network"].update(prefix=40), "network.prefix must be 1..32"),
        (lambda d: d["image"].update(color="red"), "plan has a bad field"),
    ],
)
def test_a_bad_plan_is_rejected_with_a_message_naming_the_field(mutate: object, message: str) -> None:
    data = json.loads(_plan().to_json())
    mutate(data)  # type: ignore[operator]
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


@given(st.binary(max_size=200))
def test_plan_decoder_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(PlanError):
        Plan.from_json(data)


@given(st.binary(max_size=200))
def test_control_decoder_rejects_garbage_cleanly(data: bytes) -> None:
    try:
        message = decode(data)
    except ControlError:
        return
    assert isinstance(message["type"], str)


def test_control_stream_carries_messages_both_ways() -> None:
    left, right = socket.socketpair()
    a, b = ControlStream(left), ControlStream(right)
    a.send({"type": "log", "stream": "stdout", "line": "hello\nworld"})
    a.close()
    assert list(b) == [{"type": "log", "stream": "stdout", "line": "hello\nworld"}]
    assert encode({"type": "x"}).endswith(b"\n")


def test_exec_request_and_frames_round_trip() -> None:
    request = ep.ExecRequest(id="abc", argv=["cat", "/etc/hostname"], tty=True, rows=40, cols=100)
    left, right = socket.socketpair()
    left.sendall(request.to_line() + ep.frame(ep.STDIN, b"data") + ep.resize_frame(50, 132) + ep.exit_frame(3))
    left.close()
    assert ep.ExecRequest.from_line(ep.read_line(right)) == request
    assert ep.read_frame(right) == (ep.STDIN, b"data")
    kind, payload = ep.read_frame(right) or (None, b"")
    assert kind == ep.RESIZE and ep.parse_resize(payload) == (50, 132)
    assert ep.read_frame(right) == (ep.EXIT, b"3")
    assert ep.read_frame(right) is None


@pytest.mark.parametrize(
    "line", [b"not json\n", b'{"id": "x", "argv": []}\n', b'{"id": "x", "argv": ["ls"], "target": "host"}\n',
             b'{"id": "x", "argv": ["ls"], "extra": 1}\n'],
)
def test_bad_exec_requests_are_refused(line: bytes) -> None:
    with pytest.raises(ep.ExecProtocolError):
        ep.ExecRequest.from_line(line)


def test_an_oversized_exec_frame_is_refused() -> None:
    left, right = socket.socketpair()
    left.sendall(bytes([ep.STDOUT]) + (ep.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ep.ExecProtocolError, match="exceeds"):
        ep.read_frame(right)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@given(st.fixed_dictionaries({"version": st.just(1), "name": _json_values, "image": _json_values,
                              "network": _json_values, "cmd": _json_values, "env": _json_values,
                              "volumes": _json_values}))
def test_plan_validation_never_crashes_on_wrong_types(data: dict[str, object]) -> None:
    with contextlib.suppress(PlanError):
        Plan.from_dict(data)
