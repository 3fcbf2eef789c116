"""The framed protocol (sandvm.wire): encoding, incremental decoding, validation."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandvm import wire
from sandvm.wire import FrameDecoder, ProtocolViolation

ALL_TYPES = sorted(wire.FRAME_NAMES)

frames_st = st.tuples(
    st.sampled_from(ALL_TYPES),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.binary(max_size=300),
)


def header(ftype: int, stream: int, length: int, magic: int = wire.MAGIC) -> bytes:
    return wire.HEADER.pack(magic, ftype, stream, length)


# ------------------------------------------------------------------ constants


def test_frame_types_are_distinct_and_named() -> None:
    types = [wire.HELLO, wire.OPEN, wire.DATA, wire.EOF, wire.WINDOW, wire.REPLY,
             wire.RESET, wire.CTRL, wire.EVENT, wire.PING, wire.PONG, wire.GOAWAY]
    assert len(set(types)) == len(types)
    assert set(types) == set(wire.FRAME_NAMES)
    assert all(0 < t < 256 for t in types)
    assert wire.HEADER_SIZE == 10
    # the largest frame must be able to carry a full DATA chunk plus its channel byte
    assert wire.DATA_CHUNK + 1 <= wire.MAX_PAYLOAD
    assert wire.MAX_JSON <= wire.MAX_PAYLOAD


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("ftype", ALL_TYPES, ids=[wire.FRAME_NAMES[t] for t in ALL_TYPES])
@pytest.mark.parametrize("payload", [b"", b"\x00", b"hello", bytes(range(256)) * 4])
@pytest.mark.parametrize("stream", [0, 1, 2, 0xFFFFFFFF])
def test_encode_decode_round_trip_every_type(ftype: int, stream: int, payload: bytes) -> None:
    frame = wire.encode(ftype, stream, payload)
    assert len(frame) == wire.HEADER_SIZE + len(payload)
    assert frame[0] == wire.MAGIC
    assert wire.HEADER.unpack_from(frame) == (wire.MAGIC, ftype, stream, len(payload))
    dec = FrameDecoder()
    assert dec.feed(frame) == [(ftype, stream, payload)]
    assert dec.pending == 0


def test_encode_accepts_exactly_max_payload() -> None:
    payload = b"\x07" * wire.MAX_PAYLOAD
    frame = wire.encode(wire.DATA, 1, payload)
    dec = FrameDecoder()
    assert dec.feed(frame) == [(wire.DATA, 1, payload)]
    assert dec.pending == 0


@pytest.mark.parametrize("ftype", ALL_TYPES, ids=[wire.FRAME_NAMES[t] for t in ALL_TYPES])
def test_encode_refuses_oversized_payload(ftype: int) -> None:
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode(ftype, 1, b"x" * (wire.MAX_PAYLOAD + 1))


def test_encode_data_refuses_chunk_that_overflows_with_channel_byte() -> None:
    # MAX_PAYLOAD data bytes + 1 channel byte is one byte too many
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode_data(1, wire.CH_STDOUT, b"x" * wire.MAX_PAYLOAD)
    frame = wire.encode_data(1, wire.CH_STDOUT, b"x" * (wire.MAX_PAYLOAD - 1))
    assert len(frame) == wire.HEADER_SIZE + wire.MAX_PAYLOAD


def test_encode_json_refuses_oversized_control_message() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode_json(wire.OPEN, 1, {"pad": "x" * wire.MAX_JSON})


@pytest.mark.parametrize("ftype", [wire.HELLO, wire.OPEN, wire.REPLY, wire.RESET, wire.CTRL,
                                   wire.EVENT])
def test_json_round_trip(ftype: int) -> None:
    obj = {"op": "exec", "argv": ["sh", "-c", "echo ü"], "n": 3, "x": None, "nested": {"a": [1]}}
    frame = wire.encode_json(ftype, 5, obj)
    [(t, sid, payload)] = FrameDecoder().feed(frame)
    assert (t, sid) == (ftype, 5)
    assert wire.decode_json(payload) == obj
    # compact separators: no whitespace padding on the wire
    assert b", " not in payload and b": " not in payload


@pytest.mark.parametrize("channel", [wire.CH_STDIN, wire.CH_STDOUT, wire.CH_STDERR])
@pytest.mark.parametrize("data", [b"", b"abc", b"\x00\xff" * 100])
def test_data_round_trip(channel: int, data: bytes) -> None:
    frame = wire.encode_data(7, channel, data)
    [(t, sid, payload)] = FrameDecoder().feed(frame)
    assert (t, sid) == (wire.DATA, 7)
    assert wire.split_channel(payload) == (channel, data)


@pytest.mark.parametrize("inc", [1, 4096, wire.INITIAL_WINDOW, 1 << 30])
def test_window_round_trip(inc: int) -> None:
    frame = wire.encode_window(9, inc)
    [(t, sid, payload)] = FrameDecoder().feed(frame)
    assert (t, sid) == (wire.WINDOW, 9)
    assert len(payload) == 4
    assert wire.decode_window(payload) == inc


def test_hello_payload() -> None:
    p = wire.hello_payload("host", extra="y")
    assert p["proto"] == "sandvm-agent"
    assert p["version"] == wire.PROTOCOL_VERSION
    assert p["role"] == "host"
    assert p["features"] == list(wire.FEATURES)
    assert p["extra"] == "y"
    # it must survive the wire
    frame = wire.encode_json(wire.HELLO, 0, p)
    [(_, _, payload)] = FrameDecoder().feed(frame)
    assert wire.decode_json(payload) == p


# ------------------------------------------------------------------ incremental decoding


@given(st.lists(frames_st, max_size=8))
@settings(max_examples=100, deadline=None)
def test_decoder_byte_by_byte(frames: list[tuple[int, int, bytes]]) -> None:
    blob = b"".join(wire.encode(*f) for f in frames)
    dec = FrameDecoder()
    out: list[tuple[int, int, bytes]] = []
    for i in range(len(blob)):
        out += dec.feed(blob[i:i + 1])
        # never buffers more than one frame's worth
        assert dec.pending <= wire.HEADER_SIZE + 300
    assert out == frames
    assert dec.pending == 0


@given(st.lists(frames_st, max_size=8), st.data())
@settings(max_examples=200, deadline=None)
def test_decoder_random_splits(frames: list[tuple[int, int, bytes]], data: st.DataObject) -> None:
    blob = b"".join(wire.encode(*f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    pieces = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
    assert b"".join(pieces) == blob
    dec = FrameDecoder()
    out: list[tuple[int, int, bytes]] = []
    for piece in pieces:
        out += dec.feed(piece)
    assert out == frames
    assert dec.pending == 0


def test_decoder_keeps_partial_frame_pending() -> None:
    frame = wire.encode(wire.DATA, 1, b"\x01payload")
    dec = FrameDecoder()
    assert dec.feed(frame[:4]) == []
    assert dec.pending == 4
    assert dec.feed(frame[4:12]) == []  # header complete, 2 payload bytes buffered
    assert dec.pending == 2
    assert dec.feed(frame[12:] + frame[:3]) == [(wire.DATA, 1, b"\x01payload")]
    assert dec.pending == 3


def test_decoder_empty_feed() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.pending == 0


# ------------------------------------------------------------------ hostile headers


def _assert_rejects_header(dec: FrameDecoder, hdr: bytes, match: str) -> None:
    """The violation must fire on the 10th header byte, before any payload."""
    assert len(hdr) == wire.HEADER_SIZE
    assert dec.feed(hdr[:-1]) == []  # incomplete header: nothing to judge yet
    assert dec.pending == wire.HEADER_SIZE - 1
    with pytest.raises(ProtocolViolation, match=match):
        dec.feed(hdr[-1:])
    assert dec.pending <= wire.HEADER_SIZE


@pytest.mark.parametrize("magic", [0x00, 0xA4, 0xA6, 0xFF, 0x5A])
def test_bad_magic_rejected_on_header(magic: int) -> None:
    _assert_rejects_header(FrameDecoder(), header(wire.DATA, 1, 5, magic=magic), "magic")


@pytest.mark.parametrize("ftype", [0, 13, 99, 255])
def test_unknown_frame_type_rejected_on_header(ftype: int) -> None:
    assert ftype not in wire.FRAME_NAMES
    _assert_rejects_header(FrameDecoder(), header(ftype, 1, 5), "unknown frame type")


@pytest.mark.parametrize("length", [wire.MAX_PAYLOAD + 1, 1 << 24, 0xFFFFFFFF])
def test_oversized_length_rejected_on_header(length: int) -> None:
    _assert_rejects_header(FrameDecoder(), header(wire.DATA, 1, length), "exceeds")


def test_oversized_length_rejected_when_header_fed_at_once() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolViolation, match="exceeds"):
        dec.feed(header(wire.REPLY, 1, 0xFFFFFFFF))
    assert dec.pending <= wire.HEADER_SIZE


def test_max_length_header_accepted() -> None:
    dec = FrameDecoder()
    assert dec.feed(header(wire.DATA, 1, wire.MAX_PAYLOAD)) == []
    assert dec.pending == 0  # header consumed, waiting for the payload


def test_custom_max_payload_is_enforced() -> None:
    dec = FrameDecoder(max_payload=16)
    assert dec.feed(wire.encode(wire.DATA, 1, b"x" * 16)) == [(wire.DATA, 1, b"x" * 16)]
    _assert_rejects_header(dec, header(wire.DATA, 1, 17), "exceeds")


def test_bad_header_after_good_frame_in_same_feed() -> None:
    dec = FrameDecoder()
    blob = wire.encode(wire.PING, 0, b"t") + header(wire.DATA, 1, 5, magic=0)
    with pytest.raises(ProtocolViolation, match="magic"):
        dec.feed(blob)


def test_bad_header_after_payload_completes() -> None:
    dec = FrameDecoder()
    assert dec.feed(wire.encode(wire.PING, 0, b"abc")) == [(wire.PING, 0, b"abc")]
    _assert_rejects_header(dec, header(200, 0, 0), "unknown frame type")


@given(st.binary(min_size=wire.HEADER_SIZE, max_size=64))
@settings(max_examples=200, deadline=None)
def test_garbage_either_decodes_or_violates(blob: bytes) -> None:
    dec = FrameDecoder()
    try:
        frames = dec.feed(blob)
    except ProtocolViolation:
        return
    for ftype, _, payload in frames:
        assert ftype in wire.FRAME_NAMES
        assert len(payload) <= wire.MAX_PAYLOAD
    assert dec.pending <= len(blob)


# ------------------------------------------------------------------ decode_json


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"{", b"{'a': 1}", b"\xff\xfe\x00", b"{\"a\": \xff}", b"\x00",
])
def test_decode_json_rejects_non_json(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="not JSON"):
        wire.decode_json(payload)


@pytest.mark.parametrize("payload", [b"[]", b"[1, 2]", b"1", b"\"s\"", b"null", b"true"])
def test_decode_json_rejects_non_object(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="not a JSON object"):
        wire.decode_json(payload)


def test_decode_json_rejects_oversized() -> None:
    payload = json.dumps({"pad": "x" * wire.MAX_JSON}).encode()
    assert len(payload) > wire.MAX_JSON
    with pytest.raises(ProtocolViolation, match="exceeds"):
        wire.decode_json(payload)


def test_decode_json_accepts_up_to_max_json() -> None:
    pad = wire.MAX_JSON - len(b'{"p":""}')
    payload = b'{"p":"' + b"x" * pad + b'"}'
    assert len(payload) == wire.MAX_JSON
    assert wire.decode_json(payload) == {"p": "x" * pad}


@pytest.mark.parametrize("payload", [b"[" * 100_000, b'{"a":' * 50_000])
def test_decode_json_rejects_deeply_nested(payload: bytes) -> None:
    assert len(payload) <= wire.MAX_JSON
    with pytest.raises(ProtocolViolation):
        wire.decode_json(payload)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_decode_json_only_raises_protocol_violation(payload: bytes) -> None:
    try:
        obj = wire.decode_json(payload)
    except ProtocolViolation:
        return
    assert isinstance(obj, dict)


# ------------------------------------------------------------------ decode_window


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00", b"x" * 8])
def test_decode_window_rejects_wrong_size(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="4 bytes"):
        wire.decode_window(payload)


@pytest.mark.parametrize("inc", [0, (1 << 30) + 1, 0x80000000, 0xFFFFFFFF])
def test_decode_window_rejects_out_of_range(inc: int) -> None:
    with pytest.raises(ProtocolViolation, match="out of range"):
        wire.decode_window(struct.pack(">I", inc))


# ------------------------------------------------------------------ split_channel


def test_split_channel_rejects_empty() -> None:
    with pytest.raises(ProtocolViolation, match="channel byte"):
        wire.split_channel(b"")


@pytest.mark.parametrize("channel", [3, 4, 127, 255])
def test_split_channel_rejects_unknown_channel(channel: int) -> None:
    with pytest.raises(ProtocolViolation, match="unknown channel"):
        wire.split_channel(bytes((channel,)) + b"data")


@pytest.mark.parametrize("channel", [wire.CH_STDIN, wire.CH_STDOUT, wire.CH_STDERR])
def test_split_channel_accepts_known_channels(channel: int) -> None:
    assert wire.split_channel(bytes((channel,))) == (channel, b"")
    assert wire.split_channel(bytes((channel,)) + b"\x03xy") == (channel, b"\x03xy")


# ------------------------------------------------------------------ decoded size (issue 14)


@pytest.mark.parametrize("payload", [
    b'{"n":1e400}', b'{"n":-1e999}', b'{"n":NaN}', b'{"n":Infinity}', b'{"n":-Infinity}',
    b'{"n":1' + b"0" * 5000 + b"}",
], ids=["1e400", "-1e999", "nan", "inf", "-inf", "5000-digits"])
def test_numbers_json_cannot_hold_are_protocol_violations(payload: bytes) -> None:
    with pytest.raises(wire.ProtocolViolation):
        wire.decode_json(payload)


def test_footprint_measures_decoded_objects_not_wire_bytes() -> None:
    dicts = b'{"e":[' + b",".join([b"{}"] * 10_000) + b"]}"
    _, size = wire.decode_json_sized(dicts)
    assert size > 20 * len(dicts)  # ~72 bytes of objects per 3 bytes on the wire
    text = b'{"e":"' + b"x" * 100_000 + b'"}'
    _, size = wire.decode_json_sized(text)
    assert 100_000 <= size < 101_000


def test_decoded_size_and_nesting_are_capped() -> None:
    big = b'{"e":[' + b",".join([b"{}"] * 87_000) + b"]}"
    assert len(big) <= wire.MAX_JSON
    with pytest.raises(wire.ProtocolViolation, match="MiB of objects"):
        wire.decode_json_sized(big)
    wire.decode_json_sized(big, limit=64 << 20)  # the cap is the caller's to choose
    deep = b'{"e":' + b"[" * wire.MAX_DEPTH + b"]" * wire.MAX_DEPTH + b"}"
    with pytest.raises(wire.ProtocolViolation, match="nested deeper"):
        wire.decode_json_sized(deep)
    ok = b'{"e":' + b"[" * (wire.MAX_DEPTH - 2) + b"]" * (wire.MAX_DEPTH - 2) + b"}"
    wire.decode_json_sized(ok)
