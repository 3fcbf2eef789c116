"""Resynchronising on a HELLO after a peer that left mid-way (wire.scan_for_hello)."""

from __future__ import annotations

import json
import random
from typing import Any

from sandvm import wire


def _hello(**fields: Any) -> bytes:
    return wire.encode_json(wire.HELLO, 0, wire.hello_payload("agent", **fields))


def _ours(msg: dict[str, Any]) -> bool:
    return msg.get("role") == "agent" and msg.get("session") in (None, "new")


def test_skips_old_streams_and_a_torn_frame() -> None:
    old = wire.encode_data(3, wire.CH_STDOUT, b"x" * 5000)
    after = wire.encode_json(wire.REPLY, 5, {"ok": True})
    buf = bytearray(old[1234:] + wire.encode_json(wire.REPLY, 3, {"exit": 0})
                    + _hello(session="new") + after)
    rejected: list[str] = []
    msg = wire.scan_for_hello(buf, _ours, rejected)
    assert msg is not None and msg["session"] == "new"
    assert bytes(buf) == after  # what follows the HELLO is left to the decoder
    assert rejected == []


def test_a_stale_hello_of_another_session_is_passed_over() -> None:
    buf = bytearray(_hello(session="old") + wire.encode_data(3, 1, b"late") +
                    _hello(session="new"))
    rejected: list[str] = []
    msg = wire.scan_for_hello(buf, _ours, rejected)
    assert msg is not None and msg["session"] == "new" and not buf
    assert rejected == ["a HELLO that is not this peer's"]


def test_a_fake_header_announcing_more_bytes_does_not_hide_the_real_hello() -> None:
    # old data that happens to contain the HELLO header bytes, announcing 9000 bytes
    fake = wire.HEADER.pack(wire.MAGIC, wire.HELLO, 0, 9000)
    buf = bytearray(b"junk" + fake + b"{" * 10)
    assert wire.scan_for_hello(buf, _ours) is None
    assert bytes(buf).startswith(fake)  # kept: it may still complete
    buf += _hello(session="new")
    msg = wire.scan_for_hello(buf, _ours)
    assert msg is not None and msg["session"] == "new"


def test_malformed_hellos_are_reported_and_skipped() -> None:
    bad = wire.encode(wire.HELLO, 0, b"not json")
    rejected: list[str] = []
    buf = bytearray(bad)
    assert wire.scan_for_hello(buf, _ours, rejected) is None
    assert rejected and "malformed HELLO" in rejected[0]


def test_hello_split_across_feeds() -> None:
    frame = _hello(session="new")
    buf = bytearray()
    for i in range(len(frame)):
        buf += frame[i:i + 1]
        msg = wire.scan_for_hello(buf, _ours)
        if i < len(frame) - 1:
            assert msg is None
    assert msg is not None and json.dumps(msg)


def test_garbage_never_grows_the_buffer() -> None:
    rng = random.Random(3)
    buf = bytearray()
    marker = wire.HEADER.pack(wire.MAGIC, wire.HELLO, 0, 0)[:6]
    for _ in range(300):
        chunk = bytearray(rng.randbytes(32 * 1024))
        chunk[100:106] = marker  # plenty of candidate headers with random lengths
        buf += chunk
        assert wire.scan_for_hello(buf, _ours) is None
        assert len(buf) <= wire.HEADER_SIZE + wire.HELLO_MAX
    buf += _hello(session="new")
    assert wire.scan_for_hello(buf, _ours) is not None
