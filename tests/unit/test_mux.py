"""The mux frame format: encode/decode round trips, resynchronisation, and a decoder that survives any input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcvm_wire import mux
from fcvm_wire.mux import Frame, FrameDecoder, Kind, ProtocolError

_HELLO_LEN = len(mux.encode_hello(1, 1, 1)) - mux.HEADER.size


def _frames_strategy() -> st.SearchStrategy[Frame]:
    stream = st.integers(min_value=1, max_value=2**32 - 1)
    u32 = st.integers(min_value=0, max_value=2**32 - 1)
    return st.one_of(
        st.builds(lambda s, p: Frame(Kind.DATA, s, p), stream, st.binary(max_size=3000)),
        st.builds(lambda s, p, w: Frame(Kind.OPEN, s, mux.encode_open(s, p, w)[mux.HEADER.size :]), stream, u32, u32),
        st.builds(lambda s, v: Frame(Kind.OPEN_OK, s, v.to_bytes(4, "big")), stream, u32),
        st.builds(lambda s, v: Frame(Kind.OPEN_REFUSED, s, v.to_bytes(4, "big")), stream, u32),
        st.builds(lambda s, v: Frame(Kind.WINDOW, s, v.to_bytes(4, "big")), stream, u32),
        st.builds(lambda s: Frame(Kind.EOF, s, b""), stream),
        st.builds(lambda s: Frame(Kind.RESET, s, b""), stream),
        st.builds(
            lambda a, b, r: Frame(Kind.HELLO, 0, mux.encode_hello(1, a, b, ready=r)[mux.HEADER.size :]),
            st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.booleans(),
        ),
    )


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for point in [*points, len(data)]:
        chunks.append(data[last:point])
        last = point
    return chunks


def test_each_kind_round_trips() -> None:
    hello = mux.encode_hello(mux.ROLE_GUEST, 7, 9, ready=True)
    wire = (
        hello
        + mux.encode_open(3, 1024, 256 * 1024)
        + mux.encode_u32(Kind.OPEN_OK, 3, 4096)
        + mux.encode(Kind.DATA, 3, b"x" * mux.MAX_PAYLOAD)
        + mux.encode_u32(Kind.WINDOW, 3, 65536)
        + mux.encode(Kind.EOF, 3)
        + mux.encode(Kind.RESET, 5)
        + mux.encode_u32(Kind.OPEN_REFUSED, 7, 111)
    )
    frames = FrameDecoder().feed(wire)
    assert [f.kind for f in frames if isinstance(f, Frame)] == [
        Kind.HELLO, Kind.OPEN, Kind.OPEN_OK, Kind.DATA, Kind.WINDOW, Kind.EOF, Kind.RESET, Kind.OPEN_REFUSED,
    ]
    first = frames[0]
    assert isinstance(first, Frame)
    assert mux.parse_hello(first.payload) == mux.Hello(mux.PROTOCOL_VERSION, mux.ROLE_GUEST, 7, 9, True)
    second = frames[1]
    assert isinstance(second, Frame)
    assert mux.parse_open(second.payload) == (1024, 256 * 1024)


def test_encode_rejects_what_the_decoder_would_reject() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        mux.encode(Kind.DATA, 1, b"x" * (mux.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="must be 4 bytes"):
        mux.encode(Kind.WINDOW, 1, b"")
    with pytest.raises(ValueError, match="unknown"):
        mux.encode(0, 1)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_frames_strategy(), max_size=30), cuts=st.lists(st.integers(0, 10**6), max_size=40))
def test_round_trip_in_any_chunking(frames: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(mux.encode(f.kind, f.stream, f.payload) for f in frames)
    decoder = FrameDecoder(synced=True)
    out: list[Frame | ProtocolError] = []
    for chunk in _split(wire, cuts):
        out.extend(decoder.feed(chunk))
    assert out == frames
    assert decoder.buffered == 0


@settings(max_examples=400, deadline=2000)
@given(junk=st.binary(max_size=20000), cuts=st.lists(st.integers(0, 10**6), max_size=20), synced=st.booleans())
def test_decoder_survives_any_bytes(junk: bytes, cuts: list[int], synced: bool) -> None:
    decoder = FrameDecoder(synced=synced)
    for chunk in _split(junk, cuts):
        for item in decoder.feed(chunk):
            assert isinstance(item, Frame | ProtocolError)
        # Never holds more than one maximal frame plus the chunk just fed.
        assert decoder.buffered <= mux.HEADER.size + mux.MAX_PAYLOAD + len(chunk)


@settings(max_examples=200, deadline=2000)
@given(junk=st.binary(max_size=5000), synced=st.booleans())
def test_garbage_then_preamble_then_hello_resynchronises(junk: bytes, synced: bool) -> None:
    """Whatever state a peer's death left behind, the next attachment's preamble + HELLO gets through."""
    hello = mux.encode_hello(mux.ROLE_HOST, 42, 0)
    decoder = FrameDecoder(synced=synced)
    decoder.feed(junk)
    out = decoder.feed(mux.PREAMBLE + hello + mux.encode(Kind.EOF, 3))
    frames = [f for f in out if isinstance(f, Frame)]
    assert frames[-2:] == [Frame(Kind.HELLO, 0, hello[mux.HEADER.size :]), Frame(Kind.EOF, 3)]


def test_half_a_frame_is_completed_by_the_preamble() -> None:
    decoder = FrameDecoder(synced=True)
    partial = mux.encode(Kind.DATA, 5, b"y" * 60000)[:1000]
    assert decoder.feed(partial) == []
    hello = mux.encode_hello(mux.ROLE_GUEST, 1, 0)
    out = decoder.feed(mux.PREAMBLE + hello)
    assert out[-1] == Frame(Kind.HELLO, 0, hello[mux.HEADER.size :])


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (bytes([99]) + b"\0" * 8, "unknown frame kind 99"),
        (mux.HEADER.pack(Kind.DATA, 1, mux.MAX_PAYLOAD + 1), "exceeds"),
        (mux.HEADER.pack(Kind.WINDOW, 1, 3) + b"abc", "3-byte payload"),
        (mux.HEADER.pack(Kind.DATA, 0, 1) + b"z", "on stream 0"),
        (mux.HEADER.pack(Kind.HELLO, 0, _HELLO_LEN) + b"\1" * _HELLO_LEN, "bad magic"),
    ],
)
def test_bad_frames_are_reported_and_drop_sync(wire: bytes, problem: str) -> None:
    decoder = FrameDecoder(synced=True)
    out = decoder.feed(wire + mux.encode(Kind.EOF, 1))
    assert isinstance(out[0], ProtocolError)
    assert problem in str(out[0])
    assert not decoder.synced
    assert all(not isinstance(item, Frame) for item in out)  # nothing accepted until the next HELLO


def test_source_text_does_not_contain_the_sync_signature() -> None:
    """The mux source travels through fuse-pipe volumes; it must not look like a HELLO."""
    with open(mux.__file__, "rb") as source:
        assert mux.HELLO_SIGNATURE not in source.read()
