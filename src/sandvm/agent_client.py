"""Host side of the agent protocol: one connection, many concurrent streams.

Everything the guest sends is hostile. The decoder caps frame sizes before
allocating. The connection is closed with AgentProtocolError when the guest
sends more DATA than the credit it was granted, an empty DATA frame, data
after EOF, a second EOF, more queued control items than a stream may hold (by
count, or by the bytes their decoded messages take, per stream and per
connection), a frame for a stream the host never opened, JSON that is not an
object (or nested too deep, or decoding to too much), or a frame that makes no
sense where it arrives. A HELLO of another protocol version, or lacking a feature
the host needs, is AgentVersionMismatch. Every wait that depends on the guest is
bounded: reads by the caller's timeout, writes by ``write_timeout``.

Numbers and strings read from guest replies go through the typed readers below
(:func:`guest_int`, :func:`guest_float`, ...): a value of the wrong type or out of
range is AgentProtocolError, never a TypeError or OverflowError at the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandvm import wire
from sandvm.errors import (
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentVersionMismatch,
    CommandNotFound,
    FileTooLarge,
    GuestError,
    GuestFileExists,
    GuestFileNotFound,
    GuestPermissionDenied,
    InvalidPath,
    InvalidSpec,
    PortError,
    PortRefused,
    PortReset,
    PortTimeout,
    SandvmError,
)

__all__ = ["AgentConnection", "AgentInfo", "HostStream", "StreamItem", "guest_bool",
           "guest_float", "guest_int", "guest_list", "guest_opt_int", "guest_str"]

READ_SIZE = 1 << 18
WRITE_TIMEOUT = 60.0
MAX_QUEUED_ITEMS = 4096  # non-DATA items a stream may hold unread (DATA is bounded by credit)
# bytes of non-DATA items (their decoded messages, wire.json_footprint, plus ITEM_OVERHEAD
# each) a stream may hold unread, and all open streams of one connection together; a
# guest that exceeds either loses its connection (read when charged, so tests and the
# flood benchmark can change them)
MAX_QUEUED_BYTES = 8 << 20
MAX_CONN_QUEUED_BYTES = 32 << 20
MAX_MESSAGE_BYTES = wire.MAX_DECODED  # what one decoded guest message may take
ITEM_OVERHEAD = 256  # a queued StreamItem's own objects, besides its message
# DATA is bounded by credit, but a queued item costs ~130 bytes whatever it holds: a
# guest sending 1-byte frames would make a 1 MiB window cost 130 MB. Small DATA frames
# are therefore merged into the stream's last unread chunk of the same channel, and
# every queued DATA item is charged ITEM_OVERHEAD against the byte caps above.
MERGE_BELOW = 4096
INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class AgentInfo:
    """What the agent said in its HELLO."""

    version: int
    agent_version: str
    features: tuple[str, ...]
    kernel: str
    boot_id: str
    instance: str


@dataclass(frozen=True)
class StreamItem:
    """One thing that arrived on a stream: kind is data, eof, event, reply or error."""

    kind: str
    channel: int = 0
    data: bytes = b""
    message: dict[str, Any] | None = None
    error: SandvmError | None = None


_GUEST_CODES: dict[str, type[SandvmError]] = {
    "file_not_found": GuestFileNotFound,
    "file_exists": GuestFileExists,
    "permission_denied": GuestPermissionDenied,
    "file_too_large": FileTooLarge,
    "command_not_found": CommandNotFound,
    "invalid_path": InvalidPath,
    "connection_refused": PortRefused,
    "connection_reset": PortReset,
    "connect_timeout": PortTimeout,
    "connect_failed": PortError,
}


def _bad(what: str, key: str, why: str) -> AgentProtocolError:
    return AgentProtocolError(f"guest sent a malformed {what}: {key} {why}")


def guest_int(msg: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = INT64_MAX,
              default: int | None = None, what: str = "reply") -> int:
    """``msg[key]`` as an int in [lo, hi]; ``default`` when absent or null (if given).
    Raises AgentProtocolError otherwise (a bool, a float, a 400-digit number...)."""
    v = msg.get(key)
    if v is None and default is not None:
        return default
    if type(v) is not int:
        raise _bad(what, key, "is not an integer")
    if not lo <= v <= hi:
        raise _bad(what, key, f"is out of range [{lo}, {hi}]")
    return v


def guest_opt_int(msg: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = INT64_MAX,
                  what: str = "reply") -> int | None:
    """``msg[key]`` as an int in [lo, hi], or None when absent or null."""
    if msg.get(key) is None:
        return None
    return guest_int(msg, key, lo=lo, hi=hi, what=what)


def guest_float(msg: Mapping[str, Any], key: str, *, lo: float = 0.0, hi: float = 1e12,
                default: float | None = None, what: str = "reply") -> float:
    """``msg[key]`` (an int or a float) as a finite float in [lo, hi]; ``default`` when
    absent or null (if given). Raises AgentProtocolError otherwise."""
    v = msg.get(key)
    if v is None and default is not None:
        return default
    if type(v) is int:
        if not lo <= v <= hi:  # compared as ints: a 400-digit one never reaches float()
            raise _bad(what, key, f"is out of range [{lo}, {hi}]")
        return float(v)
    if type(v) is not float:
        raise _bad(what, key, "is not a number")
    if not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(what, key, f"is out of range [{lo}, {hi}]")
    return v


def guest_str(msg: Mapping[str, Any], key: str, *, max_len: int = 4096,
              default: str | None = None, what: str = "reply") -> str:
    """``msg[key]`` as a str of at most ``max_len`` characters; ``default`` when absent
    or null (if given). Raises AgentProtocolError otherwise."""
    v = msg.get(key)
    if v is None and default is not None:
        return default
    if type(v) is not str:
        raise _bad(what, key, "is not a string")
    if len(v) > max_len:
        raise _bad(what, key, f"is longer than {max_len} characters")
    return v


def guest_bool(msg: Mapping[str, Any], key: str, *, default: bool | None = False,
               what: str = "reply") -> bool:
    """``msg[key]`` as a bool; ``default`` when absent or null (None: required)."""
    v = msg.get(key)
    if v is None and default is not None:
        return default
    if type(v) is not bool:
        raise _bad(what, key, "is not a boolean")
    return v


def guest_list(msg: Mapping[str, Any], key: str, *, max_len: int = 1 << 16,
               default: list[Any] | None = None, what: str = "reply") -> list[Any]:
    """``msg[key]`` as a list of at most ``max_len`` items; ``default`` when absent or
    null (if given). Its items are the caller's to check."""
    v = msg.get(key)
    if v is None and default is not None:
        return default
    if type(v) is not list:
        raise _bad(what, key, "is not a list")
    if len(v) > max_len:
        raise _bad(what, key, f"has more than {max_len} items")
    return v


def require_feature(conn: AgentConnection, feature: str, what: str,
                    error: type[SandvmError]) -> AgentConnection:
    """``conn`` if its agent has ``feature``; else ``error`` saying the guest must be
    rebuilt (an agent from before ``what`` existed, e.g. in an old snapshot)."""
    info = conn.info
    if info is not None and feature not in info.features:
        raise error(f"the guest agent (version {info.agent_version or '?'}) has no {what}:"
                    " rebuild the guest with `sandvm setup` (and take snapshots again)")
    return conn


def guest_error(msg: dict[str, Any]) -> SandvmError:
    """Map a guest RESET payload to a sandvm exception; unknown codes become GuestError."""
    code = msg.get("code")
    text = msg.get("message")
    text = text[:2000] if isinstance(text, str) else "the guest reported an error"
    cls = _GUEST_CODES.get(code, GuestError) if isinstance(code, str) else GuestError
    return cls(text, guest_code=code[:64] if isinstance(code, str) else None)


class _Run:
    """Unread small DATA frames of one channel, merged (becomes one StreamItem)."""

    __slots__ = ("buf", "channel")

    def __init__(self, channel: int, data: bytes) -> None:
        self.channel = channel
        self.buf = bytearray(data)


class HostStream:
    """One stream opened by the host. Items arrive in order through ``next``."""

    def __init__(self, conn: AgentConnection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self._items: deque[StreamItem | _Run] = deque()
        self._costs: deque[int] = deque()  # what each queued item is charged (bytes)
        self._ready = asyncio.Event()
        self._send_window = wire.INITIAL_WINDOW
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._recv_budget = wire.INITIAL_WINDOW  # DATA bytes the guest may still send
        self._unacked = 0  # consumed bytes whose credit is not yet returned
        self._queued_other = 0
        self._queued_bytes = 0  # charged for the items in _items
        self._attached = True  # counted in the connection's budget (still open)
        self._eof: set[int] = set()
        self.closed = False

    # called by the connection's reader
    def _charge(self, cost: int) -> None:
        """Count ``cost`` bytes more held unread; raises AgentProtocolError (which fails
        the connection) when this stream or the connection holds too much."""
        self._queued_bytes += cost
        if self._attached:
            self.conn._queued_bytes += cost
        if self._queued_bytes > MAX_QUEUED_BYTES:
            raise AgentProtocolError(
                f"guest flooded stream {self.sid} with messages: more than"
                f" {MAX_QUEUED_BYTES >> 20} MiB unread")
        if self.conn._queued_bytes > MAX_CONN_QUEUED_BYTES:
            raise AgentProtocolError(
                f"guest flooded the channel with messages: more than"
                f" {MAX_CONN_QUEUED_BYTES >> 20} MiB unread over its streams")

    def _push(self, item: StreamItem, size: int = 0) -> None:
        """Queue an item whose message holds ``size`` bytes (DATA: bounded by credit)."""
        cost = 0
        if item.kind != "data":
            self._queued_other += 1
            if self._queued_other > MAX_QUEUED_ITEMS:
                raise AgentProtocolError(f"guest flooded stream {self.sid} with messages")
            cost = size + ITEM_OVERHEAD
            self._charge(cost)
        self._items.append(item)
        self._costs.append(cost)
        self._ready.set()

    def _on_data(self, channel: int, data: bytes) -> None:
        if not data:
            raise AgentProtocolError(f"guest sent an empty DATA frame on stream {self.sid}")
        if channel in self._eof:
            raise AgentProtocolError(f"guest sent data after EOF on stream {self.sid}")
        self._recv_budget -= len(data)
        if self._recv_budget < 0:
            raise AgentProtocolError(
                f"guest overran the flow-control window on stream {self.sid}")
        if len(data) < MERGE_BELOW:
            tail = self._items[-1] if self._items else None
            if isinstance(tail, _Run) and tail.channel == channel and \
                    len(tail.buf) + len(data) <= wire.DATA_CHUNK:
                tail.buf += data
                self._ready.set()
                return
            self._charge(ITEM_OVERHEAD)
            self._items.append(_Run(channel, data))
        else:
            self._charge(ITEM_OVERHEAD)
            self._items.append(StreamItem("data", channel=channel, data=data))
        self._costs.append(ITEM_OVERHEAD)
        self._ready.set()

    def _on_eof(self, channel: int) -> None:
        if channel in self._eof:
            raise AgentProtocolError(f"guest sent a second EOF on stream {self.sid}")
        self._eof.add(channel)
        self._push(StreamItem("eof", channel=channel))

    def _on_window(self, inc: int) -> None:
        self._send_window += inc
        if self._send_window > (1 << 31):
            raise AgentProtocolError("guest granted an absurd window")
        if self._send_window > 0:
            self._window_open.set()

    def _finish(self, item: StreamItem, cost: int = 0) -> None:
        """Terminal item (``cost`` already charged): wakes every reader and any sender
        waiting for credit."""
        self.closed = True
        self._items.append(item)
        self._costs.append(cost)
        self._ready.set()
        self._window_open.set()

    async def next(self, timeout: float | None) -> StreamItem:
        """The next item; raises AgentTimeout after ``timeout`` seconds (None: no limit)."""
        while not self._items:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                raise AgentTimeout(f"no answer from the guest agent within {timeout} s") from None
        queued = self._items.popleft()
        if isinstance(queued, _Run):
            item = StreamItem("data", channel=queued.channel, data=bytes(queued.buf))
        else:
            item = queued
        cost = self._costs.popleft()
        if cost:
            self._queued_bytes -= cost
            if self._attached:
                self.conn._queued_bytes -= cost
        if item.kind != "data":
            self._queued_other -= 1
        elif not self.closed:
            # consumed: give the credit back, in batches (one WINDOW per frame would
            # double the frame count for a stream of small writes)
            self._unacked += len(item.data)
            if self._unacked >= wire.WINDOW_BATCH:
                grant, self._unacked = self._unacked, 0
                self._recv_budget += grant
                self.conn._send_nowait(wire.encode_window(self.sid, grant))
        return item

    async def send_data(self, data: bytes, *, channel: int = wire.CH_STDIN,
                        timeout: float | None = 60.0) -> None:
        """Send bytes, waiting for credit. Raises AgentTimeout if the guest stops reading."""
        view = memoryview(data)
        while view:
            if self.closed:
                raise AgentDisconnected(f"stream {self.sid} is closed")
            if self._send_window <= 0:
                self._window_open.clear()
                try:
                    await asyncio.wait_for(self._window_open.wait(), timeout)
                except TimeoutError:
                    raise AgentTimeout(f"guest did not accept data within {timeout} s") from None
                continue
            n = min(len(view), wire.DATA_CHUNK, self._send_window)
            self._send_window -= n
            await self.conn._send(wire.data_header(self.sid, channel, n), view[:n])
            view = view[n:]

    async def send_eof(self, channel: int = wire.CH_STDIN) -> None:
        if not self.closed:
            self.conn._send_nowait(wire.encode(wire.EOF, self.sid, bytes((channel,))))

    async def send_ctrl(self, msg: dict[str, Any]) -> None:
        if not self.closed:
            self.conn._send_nowait(wire.encode_json(wire.CTRL, self.sid, msg))

    async def reset(self) -> None:
        """Abandon the stream: the guest kills what it runs for it; readers get an error."""
        if self.closed:
            return
        self.conn._detach(self)
        self._finish(StreamItem("error", error=AgentError(f"stream {self.sid} was cancelled")))
        with contextlib.suppress(SandvmError):
            self.conn._send_nowait(wire.encode_json(wire.RESET, self.sid, {"code": "cancelled"}))


class AgentConnection:
    """The host end of the agent channel (a unix socket QEMU bridges to virtio-serial)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 eof_hook: Callable[[], Awaitable[SandvmError | None]] | None = None,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self._eof_hook = eof_hook
        self._reader = reader
        self._writer = writer
        self.write_timeout = write_timeout
        self._decoder = wire.FrameDecoder()
        self._streams: dict[int, HostStream] = {}
        self._queued_bytes = 0  # charged for unread non-DATA items of the open streams
        self._next_sid = 1
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._ping_ids = itertools.count()
        self._failure: SandvmError | None = None
        self._write_lock = asyncio.Lock()
        self.info: AgentInfo | None = None
        # a new session id tells the agent that streams of an earlier host (e.g. the
        # one whose VM was snapshotted) are gone
        self.session = secrets.token_hex(8)
        # until the agent's HELLO: the channel may still hold frames sent to an earlier
        # host (one that was killed mid-way), even a torn one; they are skipped
        self._synced = False
        self._presync = bytearray()
        self._hello_rejects: list[str] = []
        # let a whole window be in flight without a drain() stall per chunk
        with contextlib.suppress(AttributeError, NotImplementedError):
            writer.transport.set_write_buffer_limits(high=2 * wire.INITIAL_WINDOW)
        self._drain_above = 0  # buffered bytes below which a write needs no drain()
        with contextlib.suppress(AttributeError, NotImplementedError):
            self._drain_above = writer.transport.get_write_buffer_limits()[1]
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0,
                      eof_hook: Callable[[], Awaitable[SandvmError | None]] | None = None
                      ) -> AgentConnection:
        """Connect to the agent socket. ``eof_hook`` may explain a closed channel
        (e.g. "QEMU died") with a better error than AgentDisconnected."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        except (OSError, TimeoutError) as exc:
            raise AgentDisconnected(f"cannot connect to the agent socket {path}: {exc!r}") from exc
        return cls(reader, writer, eof_hook=eof_hook)

    @property
    def failure(self) -> SandvmError | None:
        return self._failure

    async def handshake(self, *, timeout: float) -> AgentInfo:
        """Say HELLO and wait for the agent's. Raises AgentTimeout, AgentProtocolError."""
        self._send_nowait(wire.encode_json(wire.HELLO, 0, wire.hello_payload(
            "host", session=self.session)))
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            if self._hello_rejects:
                raise self._protocol_error(
                    f"the guest agent sent no valid hello within {timeout:.0f} s; it sent"
                    f" {self._hello_rejects[-1]}") from None
            raise AgentTimeout(
                f"the guest agent did not say hello within {timeout:.0f} s") from None
        return self._parse_hello(msg)

    def _protocol_error(self, message: str) -> AgentProtocolError:
        exc = AgentProtocolError(message)
        self.fail(exc)
        return exc

    def _parse_hello(self, msg: dict[str, Any]) -> AgentInfo:
        version = msg.get("version")
        if (msg.get("proto") != "sandvm-agent" or not isinstance(version, int)
                or isinstance(version, bool)):
            raise self._protocol_error("the guest's HELLO is not a sandvm agent's")
        feats = msg.get("features")
        features = tuple(f[:64] for f in feats if isinstance(f, str))[:64] if isinstance(
            feats, list) else ()

        def s(key: str) -> str:
            v = msg.get(key)
            return v[:200] if isinstance(v, str) else ""

        agent = f"the guest agent (version {s('agent_version')[:40] or '?'})"
        fix = ("its guest assets are from another sandvm build: run `sandvm setup` with"
               " this sandvm (and take snapshots made with the old agent again)")
        if version != wire.PROTOCOL_VERSION:
            self.fail(exc := AgentVersionMismatch(
                f"{agent} speaks protocol {version}, this host speaks"
                f" {wire.PROTOCOL_VERSION}: {fix}"))
            raise exc
        missing = [f for f in wire.REQUIRED_FEATURES if f not in features]
        if missing:
            self.fail(exc := AgentVersionMismatch(
                f"{agent} lacks {', '.join(missing)}, which this host needs: {fix}"))
            raise exc

        self.info = AgentInfo(version=version, agent_version=s("agent_version"),
                              features=features, kernel=s("kernel"), boot_id=s("boot_id"),
                              instance=s("instance"))
        return self.info

    def _send_nowait(self, frame: bytes) -> None:
        """Queue a small control frame without waiting for buffer room."""
        if self._failure is not None:
            raise self._failure
        try:
            self._writer.write(frame)
        except (OSError, RuntimeError) as exc:
            self.fail(AgentDisconnected(f"agent channel write failed: {exc!r}"))
            raise self._failure from exc  # type: ignore[misc]

    async def _send(self, *parts: bytes | memoryview) -> None:
        """Write one frame (given as consecutive parts) and wait for buffer room.

        Raises AgentTimeout (and closes the connection) if the guest stops
        reading for ``write_timeout`` seconds.
        """
        if self._failure is not None:
            raise self._failure
        try:
            async with self._write_lock:
                for part in parts:
                    self._writer.write(part)
                # below the high-water mark drain() would not wait: skip wait_for's
                # task and timer (they cost more than small frames' writes)
                if self._writer.transport.get_write_buffer_size() > self._drain_above:
                    await asyncio.wait_for(self._writer.drain(), self.write_timeout)
        except TimeoutError:
            exc = AgentTimeout(f"the guest agent stopped reading for {self.write_timeout:.0f} s")
            self.fail(exc)
            raise exc from None
        except (OSError, RuntimeError) as exc:
            self.fail(AgentDisconnected(f"agent channel write failed: {exc!r}"))
            raise self._failure from exc  # type: ignore[misc]

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    reason = await self._eof_hook() if self._eof_hook else None
                    self.fail(reason or AgentDisconnected("the guest agent channel closed"))
                    return
                if not self._synced:  # skip what an earlier host left unread
                    self._presync += data
                    hello = wire.scan_for_hello(self._presync, self._hello_is_ours,
                                                self._hello_rejects)
                    del self._hello_rejects[:-1]  # the last reason is enough
                    if hello is None:
                        continue
                    data, self._presync, self._synced = bytes(self._presync), bytearray(), True
                    self._on_hello(hello)
                for ftype, sid, payload in self._decoder.feed(data):
                    self._dispatch(ftype, sid, payload)
        except wire.ProtocolViolation as exc:
            self.fail(AgentProtocolError(f"guest sent invalid protocol: {exc}"))
        except AgentProtocolError as exc:
            self.fail(exc)
        except OSError as exc:
            # a reset says as little as an EOF: the hook may know why (QEMU died)
            reason = await self._eof_hook() if self._eof_hook else None
            self.fail(reason or AgentDisconnected(f"agent channel read failed: {exc!r}"))
        except asyncio.CancelledError:
            self.fail(AgentDisconnected("agent connection closed"))
            raise

    def _hello_is_ours(self, msg: dict[str, Any]) -> bool:
        # an agent that predates sessions in its HELLO (in an old snapshot) names none
        return msg.get("role") == "agent" and msg.get("session") in (None, self.session)

    def _on_hello(self, msg: dict[str, Any]) -> None:
        if not self._hello.done():
            self._hello.set_result(msg)
            return
        instance = msg.get("instance")
        if self.info is not None and isinstance(instance, str) and \
                instance[:200] != self.info.instance:
            # a new agent process: whatever the old one was doing is gone
            lost = AgentError("the guest agent restarted; the operation was lost")
            for st in list(self._streams.values()):
                self._detach(st)
                st._finish(StreamItem("error", error=lost))
            with contextlib.suppress(AgentProtocolError):
                self._parse_hello(msg)

    def _dispatch(self, ftype: int, sid: int, payload: bytes) -> None:
        if ftype == wire.HELLO and sid == 0:
            self._on_hello(wire.decode_json_sized(payload, limit=MAX_MESSAGE_BYTES)[0])
            return
        if ftype == wire.PONG and sid == 0:
            fut = self._pings.pop(payload, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if ftype == wire.GOAWAY and sid == 0:
            self.fail(AgentDisconnected("the guest agent is going away"))
            return
        if ftype in (wire.PING, wire.OPEN, wire.HELLO, wire.PONG, wire.GOAWAY) or sid == 0:
            raise AgentProtocolError(
                f"unexpected {wire.FRAME_NAMES[ftype]} frame from guest on stream {sid}")
        st = self._streams.get(sid)
        if st is None:
            if sid % 2 == 1 and sid < self._next_sid:
                return  # a late frame for a stream we already closed
            raise AgentProtocolError(f"guest sent a frame for unknown stream {sid}")
        if ftype == wire.DATA:
            ch, data = wire.split_channel(payload)
            st._on_data(ch, data)
        elif ftype == wire.EOF:
            ch, _ = wire.split_channel(payload)
            st._on_eof(ch)
        elif ftype == wire.WINDOW:
            st._on_window(wire.decode_window(payload))
        elif ftype == wire.EVENT:
            msg, size = wire.decode_json_sized(payload, limit=MAX_MESSAGE_BYTES)
            st._push(StreamItem("event", message=msg), size)
        elif ftype == wire.REPLY:
            # decoded and charged before unregistering: a bad one fails the connection
            msg, size = wire.decode_json_sized(payload, limit=MAX_MESSAGE_BYTES)
            st._charge(size + ITEM_OVERHEAD)
            self._detach(st)
            st._finish(StreamItem("reply", message=msg), size + ITEM_OVERHEAD)
        elif ftype == wire.RESET:
            # only a capped code and text are kept of it
            msg, _ = wire.decode_json_sized(payload, limit=MAX_MESSAGE_BYTES)
            self._detach(st)
            st._finish(StreamItem("error", error=guest_error(msg)))
        else:
            raise AgentProtocolError(f"unexpected {wire.FRAME_NAMES[ftype]} frame on stream {sid}")

    def _detach(self, st: HostStream) -> None:
        """Unregister a stream that is finished: the guest can add nothing to it now, so
        what it still holds unread leaves the connection's budget (its own cap stays)."""
        if self._streams.get(st.sid) is st:
            del self._streams[st.sid]
        if st._attached:
            st._attached = False
            self._queued_bytes -= st._queued_bytes

    def fail(self, exc: SandvmError) -> None:
        """Close the connection: every open stream and waiter gets ``exc``."""
        if self._failure is not None:
            return
        self._failure = exc
        if not self._hello.done():
            self._hello.set_exception(exc)
            self._hello.exception()  # mark retrieved
        for st in list(self._streams.values()):
            self._detach(st)
            st._finish(StreamItem("error", error=exc))
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pings.clear()
        with contextlib.suppress(Exception):
            self._writer.close()

    async def open(self, request: dict[str, Any]) -> HostStream:
        """Open a stream with a JSON request.

        Raises InvalidSpec if the request is too large for one frame, the
        connection's failure if it is closed.
        """
        if self._failure is not None:
            raise self._failure
        if len(self._streams) >= wire.MAX_STREAMS:
            raise AgentError("too many concurrent operations on this sandbox")
        sid = self._next_sid
        try:
            frame = wire.encode_json(wire.OPEN, sid, request)
        except ValueError:
            raise InvalidSpec(
                f"the request is larger than {wire.MAX_JSON // 1024} KiB (a long command line"
                " or environment?): write the script to a file with files.write and run"
                " that instead") from None
        self._next_sid += 2
        st = HostStream(self, sid)
        self._streams[sid] = st
        await self._send(frame)
        return st

    async def call(self, request: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
        """A one-shot request: open, wait for the REPLY. Raises the guest's error."""
        st = await self.open(request)
        try:
            item = await st.next(timeout)
        except AgentTimeout:
            await st.reset()
            raise
        if item.kind == "reply":
            assert item.message is not None
            return item.message
        if item.kind == "error":
            assert item.error is not None
            raise item.error
        raise self._protocol_error(f"guest sent {item.kind} on a one-shot call")

    async def ping(self, *, timeout: float = 5.0) -> float:
        """Round trip to the agent in seconds."""
        loop = asyncio.get_running_loop()
        token = str(next(self._ping_ids)).encode()
        fut: asyncio.Future[None] = loop.create_future()
        self._pings[token] = fut
        t0 = loop.time()
        self._send_nowait(wire.encode(wire.PING, 0, token))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pings.pop(token, None)
            raise AgentTimeout(f"agent did not answer a ping within {timeout} s") from None
        return loop.time() - t0

    async def close(self) -> None:
        self.fail(AgentDisconnected("agent connection closed"))
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
