"""The host↔guest agent protocol: frames, limits, versions. Pure, stdlib only.

This module is copied verbatim into the guest initramfs, so it imports nothing
from sandvm.

A frame is a 10-byte header followed by ``length`` payload bytes::

    magic u8 (0xA5) | type u8 | stream u32 BE | length u32 BE | payload

Both sides check ``length`` against :data:`MAX_PAYLOAD` *before* allocating
anything for the payload. Stream 0 carries connection-level frames (HELLO,
PING/PONG, GOAWAY). The host opens odd stream ids, the guest even ones.

Per stream, each direction has a credit window (:data:`INITIAL_WINDOW` bytes);
a DATA frame spends credit, a WINDOW frame from the receiver gives it back once
the receiver has consumed the data (in batches of at least WINDOW_BATCH). A
receiver therefore never buffers more than one window of data per stream, and a
fast producer on one stream cannot starve the others: the transport is always
drained. Control items (EVENT etc.) are capped on the host side by count and by
bytes: each decoded message is measured (:func:`decode_json_sized`, which also caps
its nesting and decoded size) and the host bounds what a stream and a connection may
hold unread.

Frames on a stream: OPEN (JSON request) → any of DATA/EOF/WINDOW/CTRL/EVENT →
one of REPLY (JSON, final) or RESET (JSON error, final). DATA and EOF payloads
start with one channel byte (0 stdin / upload, 1 stdout / download, 2 stderr).
A TCP tunnel (op ``tcp_connect``, feature ``tcp``) carries host → guest bytes on
channel 0 and guest → host bytes on channel 1; EOF is a half-close, RESET an abort.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = 0xA5
HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20  # 1 MiB: any larger header is a protocol violation
MAX_JSON = 256 * 1024  # control messages (JSON) are capped tighter than data
DATA_CHUNK = 128 * 1024  # the largest DATA payload a sender emits
INITIAL_WINDOW = 1 << 20  # per-stream, per-direction credit
WINDOW_BATCH = INITIAL_WINDOW // 4  # receivers return credit in batches of at least this
MAX_STREAMS = 1024  # concurrent streams a side accepts
MAX_DEPTH = 32  # nesting a decoded control message may have (real ones have 3 or 4)
# Python objects one decoded control message may take: 256 KiB of `[{},{},...]` decodes
# to ~6 MiB, strings to about their own size
MAX_DECODED = 4 << 20

# Frame types
HELLO = 1
OPEN = 2
DATA = 3
EOF = 4
WINDOW = 5
REPLY = 6
RESET = 7
CTRL = 8
EVENT = 9
PING = 10
PONG = 11
GOAWAY = 12

FRAME_NAMES = {
    HELLO: "HELLO",
    OPEN: "OPEN",
    DATA: "DATA",
    EOF: "EOF",
    WINDOW: "WINDOW",
    REPLY: "REPLY",
    RESET: "RESET",
    CTRL: "CTRL",
    EVENT: "EVENT",
    PING: "PING",
    PONG: "PONG",
    GOAWAY: "GOAWAY",
}

CH_STDIN = 0
CH_STDOUT = 1
CH_STDERR = 2

FEATURES = ("exec", "exec.stdin", "exec.signal", "files", "files.stream", "flow-control",
            "tcp", "egress")
# what a host refuses to work without (others, e.g. "tcp", are checked when first used,
# so an agent in an older snapshot keeps working for what it has). An incompatible change
# to a request or reply bumps PROTOCOL_VERSION or adds a feature named here.
REQUIRED_FEATURES = ("exec", "exec.stdin", "exec.signal", "files", "files.stream",
                     "flow-control")


class Op(StrEnum):
    """The operations a host may OPEN a stream with (the request's ``"op"``).

    The host speaks them only through :class:`sandvm.guestops.GuestOps`; the guest
    agent serves each from one dispatch table. A *call* op answers with one REPLY
    (or RESET); a *stream* op (see :data:`STREAM_OPS`) may carry DATA, EOF and EVENT
    frames before its final REPLY/RESET."""

    # file system (calls)
    STAT = "stat"
    EXISTS = "exists"
    MAKE_DIR = "make_dir"
    REMOVE = "remove"
    RENAME = "rename"
    CHOWN = "chown"
    MOUNT_TMPFS = "mount_tmpfs"
    # file transfer (streams)
    WRITE_FILE = "write_file"
    READ_FILE = "read_file"
    LIST = "list"
    UNTAR = "untar"
    TAR = "tar"
    # commands
    EXEC = "exec"  # stream
    STATS = "stats"
    # set-up of a VM (calls)
    CONFIGURE = "configure"
    MOUNT_ROOT = "mount_root"
    MOUNT_VOLUME = "mount_volume"
    SYNC = "sync"
    # ports and egress
    TCP_CONNECT = "tcp_connect"  # stream
    TCP_LISTENING = "tcp_listening"
    EGRESS_LISTEN = "egress_listen"
    EGRESS_CLOSE = "egress_close"
    EGRESS_ACCEPT = "egress_accept"  # stream


STREAM_OPS = frozenset({Op.WRITE_FILE, Op.READ_FILE, Op.LIST, Op.UNTAR, Op.TAR, Op.EXEC,
                        Op.TCP_CONNECT, Op.EGRESS_ACCEPT})
CALL_OPS = frozenset(Op) - STREAM_OPS


class ProtocolViolation(ValueError):
    """The peer sent bytes that are not valid protocol."""


def encode(ftype: int, stream: int, payload: bytes = b"") -> bytes:
    """Encode one frame. Raises ValueError if the payload exceeds MAX_PAYLOAD."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, ftype, stream, len(payload)) + payload


def encode_json(ftype: int, stream: int, obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_JSON:
        raise ValueError(f"control message of {len(data)} bytes exceeds {MAX_JSON}")
    return encode(ftype, stream, data)


def encode_data(stream: int, channel: int, data: bytes) -> bytes:
    return encode(DATA, stream, bytes((channel,)) + data)


def encode_window(stream: int, increment: int) -> bytes:
    return encode(WINDOW, stream, struct.pack(">I", increment))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def decode_json(payload: bytes) -> dict[str, Any]:
    """Decode a JSON control payload; must be an object. Raises ProtocolViolation."""
    if len(payload) > MAX_JSON:
        raise ProtocolViolation(f"control message of {len(payload)} bytes exceeds {MAX_JSON}")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_no_constant,
                         parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolViolation(f"control message is not JSON: {exc!r}"[:200]) from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("control message is not a JSON object")
    return obj


def json_footprint(obj: Any, *, limit: int = MAX_DECODED, max_depth: int = MAX_DEPTH) -> int:
    """The bytes of Python objects a decoded JSON value holds (``sys.getsizeof`` of every
    node; shared ones counted each time, so never less than the truth).

    Raises ProtocolViolation as soon as the total exceeds ``limit`` or the nesting
    ``max_depth``. Iterative: any nesting json.loads returns is walked safely."""
    size = sys.getsizeof
    total = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        total += size(node)
        if depth > max_depth:
            raise ProtocolViolation(f"control message nested deeper than {max_depth}")
        if type(node) is dict:
            for k, v in node.items():
                total += size(k)
                if type(v) is dict or type(v) is list:
                    stack.append((v, depth + 1))
                else:
                    total += size(v)
        elif type(node) is list:
            for v in node:
                if type(v) is dict or type(v) is list:
                    stack.append((v, depth + 1))
                else:
                    total += size(v)
        if total > limit:
            raise ProtocolViolation(
                f"control message decodes to more than {limit >> 20} MiB of objects")
    return total


def decode_json_sized(payload: bytes, *, limit: int = MAX_DECODED
                      ) -> tuple[dict[str, Any], int]:
    """Decode a control payload from an untrusted peer: (object, bytes it holds in memory).

    Raises ProtocolViolation for what :func:`decode_json` refuses and for a message
    nested deeper than MAX_DEPTH or decoding to more than ``limit`` bytes."""
    obj = decode_json(payload)
    return obj, json_footprint(obj, limit=limit)


def decode_window(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolViolation("WINDOW frame payload must be 4 bytes")
    (inc,) = struct.unpack(">I", payload)
    if inc == 0 or inc > (1 << 30):
        raise ProtocolViolation(f"WINDOW increment {inc} out of range")
    return int(inc)


def split_channel(payload: bytes) -> tuple[int, bytes]:
    """Split a DATA/EOF payload into (channel, data). Raises ProtocolViolation."""
    if not payload:
        raise ProtocolViolation("DATA/EOF frame without a channel byte")
    channel = payload[0]
    if channel > CH_STDERR:
        raise ProtocolViolation(f"unknown channel {channel}")
    return channel, payload[1:]


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, get complete frames.

    Checks magic, type and length in the header before buffering the payload,
    so a hostile peer cannot make the decoder allocate more than
    HEADER_SIZE + MAX_PAYLOAD bytes. Each payload is copied once.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()  # leftover: a partial frame
        self._max = max_payload
        self._need: tuple[int, int, int] | None = None  # (type, stream, length)

    def feed(self, data: bytes | memoryview) -> list[tuple[int, int, bytes]]:
        # common case: no leftover, parse ``data`` in place; otherwise append to the
        # leftover (amortised O(1)), never re-concatenate
        if self._buf:
            self._buf += data
            buf: bytes | bytearray | memoryview = self._buf
        else:
            buf = data
        out: list[tuple[int, int, bytes]] = []
        pos = 0
        end = len(buf)
        need = self._need
        with memoryview(buf) as view:
            while True:
                if need is None:
                    if end - pos < HEADER_SIZE:
                        break
                    magic, ftype, stream, length = HEADER.unpack_from(buf, pos)
                    if magic != MAGIC:
                        raise ProtocolViolation(f"bad frame magic 0x{magic:02x}")
                    if ftype not in FRAME_NAMES:
                        raise ProtocolViolation(f"unknown frame type {ftype}")
                    if length > self._max:
                        raise ProtocolViolation(
                            f"frame length {length} exceeds the cap of {self._max} bytes"
                        )
                    pos += HEADER_SIZE
                    need = (ftype, stream, length)
                ftype, stream, length = need
                if end - pos < length:
                    break
                out.append((ftype, stream, bytes(view[pos:pos + length])))
                pos += length
                need = None
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf = bytearray(buf[pos:])
        self._need = need
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet returned as a frame."""
        return len(self._buf)


HELLO_MAX = 16 * 1024  # a HELLO's JSON is a few hundred bytes


def scan_for_hello(buf: bytearray, accept: Callable[[dict[str, Any]], bool],
                   rejected: list[str] | None = None) -> dict[str, Any] | None:
    """Resynchronise on a peer's HELLO: find, in ``buf``, the first complete HELLO frame
    on stream 0 whose JSON ``accept`` takes, and return it. ``buf`` is trimmed in place:
    to what follows that frame when one is found, else to the shortest tail that may
    still hold one (so it stays small whatever is fed).

    What a reconnecting peer reads first may be anything its predecessor left in the
    channel: frames of old streams, or the torn tail of one. All of it is skipped;
    why each complete HELLO was passed over is appended to ``rejected``."""
    marker = HEADER.pack(MAGIC, HELLO, 0, 0)[:6]
    keep = max(0, len(buf) - len(marker) + 1)  # where an unfinished candidate starts
    i = buf.find(marker)
    while i >= 0:
        length = int.from_bytes(buf[i + 6:i + HEADER_SIZE], "big")
        if len(buf) < i + HEADER_SIZE:  # header not complete yet
            keep = min(keep, i)
            break
        end = i + HEADER_SIZE + length
        if length <= HELLO_MAX:
            if len(buf) < end:  # maybe a HELLO still arriving; a later one may be whole
                keep = min(keep, i)
            else:
                try:
                    msg: dict[str, Any] | None = decode_json(bytes(buf[i + HEADER_SIZE:end]))
                except ProtocolViolation as exc:
                    msg = None
                    if rejected is not None:
                        rejected.append(f"a malformed HELLO ({exc})")
                if msg is not None:
                    if accept(msg):
                        del buf[:end]
                        return msg
                    if rejected is not None:
                        rejected.append("a HELLO that is not this peer's")
        i = buf.find(marker, i + 1)
    del buf[:keep]
    return None


def data_header(stream: int, channel: int, size: int) -> bytes:
    """Header + channel byte of a DATA frame carrying ``size`` bytes (sent with writev)."""
    if size + 1 > MAX_PAYLOAD:
        raise ValueError(f"payload of {size + 1} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, DATA, stream, size + 1) + bytes((channel,))


def hello_payload(role: str, **extra: Any) -> dict[str, Any]:
    return {"proto": "sandvm-agent", "version": PROTOCOL_VERSION, "role": role,
            "features": list(FEATURES), **extra}
