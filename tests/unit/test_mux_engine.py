"""The mux engine against a hand-driven peer that misbehaves: nothing crashes, the right thing is reset."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from fcvm_wire import mux
from fcvm_wire.mux import Frame, Kind

pytestmark = pytest.mark.timeout(60)


class RawGuest:
    """Plays the guest end of the pipe frame by frame; the engine under test is the host end."""

    def __init__(self) -> None:
        self.pipe, theirs = socket.socketpair()
        self.pipe.settimeout(5)
        self.accepted: list[socket.socket] = []
        self.engine = mux.MuxEngine(mux.ROLE_HOST, on_open=self._on_open, hello_interval=0.05, name="test")
        self.engine.start()
        fd = theirs.detach()
        self.engine.call_soon_threadsafe(lambda: self.engine.attach_transport(fd))
        self.decoder = mux.FrameDecoder()
        self.session = 77

    def _on_open(self, port: int) -> socket.socket | None:
        if port != 9:
            return None
        mine, theirs = socket.socketpair()
        self.accepted.append(mine)
        return theirs

    def send(self, wire: bytes) -> None:
        self.pipe.sendall(wire)

    def next_frame(self, kind: int | None = None) -> Frame:
        """The next frame of `kind`, or the next non-HELLO frame."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for item in self.decoder.feed(self.pipe.recv(1 << 16)):
                if not isinstance(item, Frame):
                    continue
                if item.kind == kind or (kind is None and item.kind != Kind.HELLO):
                    return item
        raise AssertionError(f"no {kind} frame")

    def handshake(self) -> int:
        hello = mux.parse_hello(self.next_frame(Kind.HELLO).payload)
        self.send(mux.encode_hello(mux.ROLE_GUEST, self.session, hello.session, ready=True))
        assert self.engine.ready.wait(5)
        return hello.session

    def close(self) -> None:
        self.engine.stop()
        self.pipe.close()
        for sock in self.accepted:
            sock.close()


@pytest.fixture
def peer() -> Iterator[RawGuest]:
    raw = RawGuest()
    try:
        yield raw
    finally:
        raw.close()


def test_open_refused_and_accepted(peer: RawGuest) -> None:
    peer.handshake()
    peer.send(mux.encode_open(2, 8, 1000))
    refused = peer.next_frame()
    assert refused.kind == Kind.OPEN_REFUSED and refused.stream == 2
    peer.send(mux.encode_open(4, 9, 1000))
    ok = peer.next_frame()
    assert ok.kind == Kind.OPEN_OK and ok.stream == 4
    peer.send(mux.encode(Kind.DATA, 4, b"hi"))
    peer.accepted[0].settimeout(5)
    assert peer.accepted[0].recv(10) == b"hi"


def test_data_on_an_unknown_stream_is_answered_with_reset(peer: RawGuest) -> None:
    peer.handshake()
    peer.send(mux.encode(Kind.DATA, 40, b"stale"))
    frame = peer.next_frame()
    assert frame == Frame(Kind.RESET, 40)


def test_window_violation_resets_only_that_stream(peer: RawGuest) -> None:
    peer.handshake()
    peer.send(mux.encode_open(2, 9, 1 << 20))
    assert peer.next_frame().kind == Kind.OPEN_OK
    peer.send(mux.encode_open(4, 9, 1 << 20))
    assert peer.next_frame().kind == Kind.OPEN_OK
    # Nobody reads stream 2's socket, so once its buffer is full no more credit is granted: sending
    # far more than the window without waiting for WINDOW frames is a violation.
    for _ in range(64):
        peer.send(mux.encode(Kind.DATA, 2, b"x" * mux.MAX_PAYLOAD))
    assert peer.next_frame(Kind.RESET).stream == 2
    peer.send(mux.encode(Kind.DATA, 4, b"fine"))
    peer.accepted[1].settimeout(5)
    assert peer.accepted[1].recv(10) == b"fine"
    assert 4 in peer.engine.streams and 2 not in peer.engine.streams


def test_open_with_this_ends_parity_is_refused(peer: RawGuest) -> None:
    peer.handshake()
    peer.send(mux.encode_open(3, 9, 1000))  # odd ids belong to the host
    frame = peer.next_frame()
    assert frame.kind == Kind.OPEN_REFUSED and frame.stream == 3


def test_garbage_resets_the_session_with_a_new_hello(peer: RawGuest) -> None:
    first = peer.handshake()
    peer.send(mux.encode_open(2, 9, 1000))
    assert peer.next_frame().kind == Kind.OPEN_OK
    peer.send(b"\x63" + b"\xff" * 40)
    hello = mux.parse_hello(peer.next_frame(Kind.HELLO).payload)
    assert hello.session != first and not hello.ready
    assert not peer.engine.streams
    peer.accepted[0].settimeout(5)
    assert peer.accepted[0].recv(10) == b""  # the old stream's local socket was closed
    peer.send(mux.encode_hello(mux.ROLE_GUEST, peer.session, hello.session, ready=True))
    assert peer.engine.ready.wait(5)


def test_wrong_version_or_role_never_becomes_ready(peer: RawGuest) -> None:
    hello = mux.parse_hello(peer.next_frame(Kind.HELLO).payload)
    peer.send(mux.encode_hello(mux.ROLE_GUEST, 5, hello.session, version=99))
    peer.send(mux.encode_hello(mux.ROLE_HOST, 5, hello.session))
    time.sleep(0.2)
    assert not peer.engine.ready.is_set()


def test_open_from_this_end_times_out_when_the_peer_is_silent(peer: RawGuest) -> None:
    peer.handshake()
    results: list[int] = []
    mine, theirs = socket.socketpair()
    peer.engine.call_soon_threadsafe(lambda: peer.engine.open_stream(7, theirs, results.append, timeout=0.2))
    assert peer.next_frame(Kind.OPEN).stream % 2 == 1
    deadline = time.monotonic() + 5
    while not results and time.monotonic() < deadline:
        time.sleep(0.01)
    assert results and results[0] != 0
    mine.close()
