"""The host side of the agent protocol against a hostile fake guest.

Every case runs a real unix-socket server (the "guest") that follows a script,
connects an AgentConnection to it and checks that the host ends with a clear
error within a bounded time: never a hang, never an unexpected exception type.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandvm import wire
from sandvm.agent_client import (
    AgentConnection,
    AgentInfo,
    guest_bool,
    guest_error,
    guest_float,
    guest_int,
    guest_list,
    guest_opt_int,
    guest_str,
)
from sandvm.commands import AsyncCommandHandle
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
    SandvmError,
)
from sandvm.guestops import entry_info as _entry
from sandvm.values import CommandResult

T = TypeVar("T")

BOUND = 5.0  # every host-side wait in this file is bounded by this
STAT = {"op": "stat", "path": "/"}
_counter = itertools.count()


class Guest:
    """The server end of one connection: reads host frames, sends scripted bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = wire.FrameDecoder()
        self.frames: deque[tuple[int, int, bytes]] = deque()
        self.received: list[tuple[int, int, bytes]] = []

    async def recv(self, timeout: float = 2.0) -> tuple[int, int, bytes]:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not data:
                raise EOFError("host closed the channel")
            self.frames.extend(self.decoder.feed(data))
        frame = self.frames.popleft()
        self.received.append(frame)
        return frame

    async def expect(self, ftype: int, timeout: float = 2.0) -> tuple[int, bytes]:
        """Skip WINDOW/PING noise until a frame of ``ftype``; return (stream, payload)."""
        while True:
            t, sid, payload = await self.recv(timeout)
            if t == ftype:
                return sid, payload
            assert t in (wire.WINDOW, wire.PING), f"unexpected {wire.FRAME_NAMES[t]} from host"

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def hello(self, **override: Any) -> None:
        payload = wire.hello_payload("agent", agent_version="t", boot_id="b", kernel="k")
        payload.update(override)
        await self.send(wire.encode_json(wire.HELLO, 0, payload))

    async def handshake(self) -> None:
        """Say hello and check the host's HELLO."""
        await self.hello()
        sid, payload = await self.expect(wire.HELLO)
        msg = wire.decode_json(payload)
        assert sid == 0
        assert msg["proto"] == "sandvm-agent" and msg["role"] == "host"
        assert msg["version"] == wire.PROTOCOL_VERSION

    async def expect_open(self, sid: int = 1) -> dict[str, Any]:
        got, payload = await self.expect(wire.OPEN)
        assert got == sid
        return wire.decode_json(payload)

    async def host_hangs_up(self, timeout: float = BOUND) -> bool:
        """Read (discarding) until EOF; True if the host closed the channel in time."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(1 << 16):
                    pass
        except (TimeoutError, ConnectionError):
            return False
        return True


GuestScript = Callable[[Guest], Awaitable[Any]]


async def run_case(sock_dir: Path, guest_script: GuestScript,
                   host: Callable[[AgentConnection], Awaitable[T]]) -> tuple[T, Any]:
    """Serve ``guest_script`` on a fresh socket; run ``host`` on a connection to it.

    Returns (host result, guest script result). The host part is bounded by
    ``asyncio.wait_for(..., BOUND)``; a hang fails the test with TimeoutError.
    """
    path = sock_dir / f"g{next(_counter)}.sock"
    loop = asyncio.get_running_loop()
    guest_done: asyncio.Future[Any] = loop.create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            result = await guest_script(Guest(reader, writer))
        except Exception as exc:  # noqa: BLE001 - surfaced to the test below
            if not guest_done.done():
                guest_done.set_exception(exc)
        else:
            if not guest_done.done():
                guest_done.set_result(result)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_unix_server(handler, path=str(path))
    try:
        conn = await AgentConnection.connect(str(path), timeout=2)
        try:
            host_result = await asyncio.wait_for(host(conn), BOUND)
        finally:
            await conn.close()
        guest_result = await asyncio.wait_for(guest_done, BOUND)
        return host_result, guest_result
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 2)
        path.unlink(missing_ok=True)


async def outcome(aw: Awaitable[T]) -> T | BaseException:
    """The awaitable's result, or the exception it raised."""
    try:
        return await aw
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# ------------------------------------------------------------------ handshake


def test_handshake_succeeds(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> AgentInfo:
        info = await conn.handshake(timeout=2)
        assert conn.info is info
        assert conn.failure is None
        return info

    info, _ = run(run_case(tmp_path, guest, host))
    assert info == AgentInfo(version=wire.PROTOCOL_VERSION, agent_version="t",
                             features=wire.FEATURES, kernel="k", boot_id="b",
                             instance="")


def test_handshake_then_call_round_trip(tmp_path: Path) -> None:
    async def guest(g: Guest) -> dict[str, Any]:
        await g.handshake()
        req = await g.expect_open(1)
        await g.send(wire.encode_json(wire.REPLY, 1, {"type": "dir", "size": 0}))
        req2 = await g.expect_open(3)
        await g.send(wire.encode_json(wire.REPLY, 3, {"n": 2}))
        assert await g.host_hangs_up()
        return {"first": req, "second": req2}

    async def host(conn: AgentConnection) -> tuple[dict[str, Any], dict[str, Any]]:
        await conn.handshake(timeout=2)
        a = await conn.call(STAT, timeout=2)
        b = await conn.call({"op": "exists", "path": "/x"}, timeout=2)
        return a, b

    (a, b), seen = run(run_case(tmp_path, guest, host))
    assert a == {"type": "dir", "size": 0}
    assert b == {"n": 2}
    assert seen == {"first": STAT, "second": {"op": "exists", "path": "/x"}}


@pytest.mark.parametrize("override", [
    {"version": wire.PROTOCOL_VERSION + 1},
    {"version": 0},
    {"version": "1"},
    {"version": 1.0},
    {"version": None},
    {"proto": "something-else"},
    {"proto": None},
], ids=["v+1", "v0", "v-str", "v-float", "v-null", "proto", "proto-null"])
def test_handshake_rejects_wrong_hello(tmp_path: Path, override: dict[str, Any]) -> None:
    async def guest(g: Guest) -> None:
        await g.hello(**override)
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> BaseException | AgentInfo:
        return await outcome(conn.handshake(timeout=2))

    res, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError), res


def test_handshake_wrong_version_message_says_what_to_do(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.hello(version=99)
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> BaseException | AgentInfo:
        return await outcome(conn.handshake(timeout=2))

    res, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError)
    assert "99" in str(res) and "sandvm setup" in str(res)


def test_handshake_rejects_boolean_version(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.hello(version=True)
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> BaseException | AgentInfo:
        return await outcome(conn.handshake(timeout=2))

    res, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError), res


@pytest.mark.parametrize("payload", [b"not json", b"[1,2]", b"\xff\xfe"])
def test_handshake_rejects_malformed_hello_payload(tmp_path: Path, payload: bytes) -> None:
    async def guest(g: Guest) -> None:
        await g.send(wire.encode(wire.HELLO, 0, payload))
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> BaseException | AgentInfo:
        return await outcome(conn.handshake(timeout=2))

    res, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError), res


def test_handshake_hostile_hello_fields_are_sanitised(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.hello(kernel="k" * 10_000, agent_version=123, boot_id=["x"],
                      features=["exec", 5, None, *wire.REQUIRED_FEATURES,
                                *[f"f{i}" for i in range(200)]])
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> AgentInfo:
        return await conn.handshake(timeout=2)

    info, _ = run(run_case(tmp_path, guest, host))
    assert info.kernel == "k" * 200
    assert info.agent_version == ""
    assert info.boot_id == ""
    assert all(isinstance(f, str) for f in info.features)
    assert info.features[0] == "exec"
    assert len(info.features) == 64


def test_handshake_times_out_without_hello(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.expect(wire.HELLO)  # the host speaks; the guest never answers
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[BaseException | AgentInfo, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        res = await outcome(conn.handshake(timeout=0.3))
        return res, loop.time() - t0

    (res, elapsed), _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentTimeout), res
    assert 0.25 <= elapsed < 2.0


def test_handshake_guest_closes_without_hello(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.expect(wire.HELLO)
        # return: the harness closes the socket

    async def host(conn: AgentConnection) -> BaseException | AgentInfo:
        return await outcome(conn.handshake(timeout=3))

    res, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentDisconnected), res


def test_connect_to_missing_socket(tmp_path: Path) -> None:
    async def main() -> BaseException | AgentConnection:
        return await outcome(AgentConnection.connect(str(tmp_path / "absent.sock"), timeout=1))

    res = run(main())
    assert isinstance(res, AgentDisconnected)
    assert "absent.sock" in str(res)


# ------------------------------------------------------------------ garbage after HELLO


def _garbage_guest(garbage: bytes) -> GuestScript:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        with contextlib.suppress(ConnectionError):
            await g.send(garbage)
        # return: the harness closes the socket (so a partial frame cannot hang the host)

    return guest


async def _call_after_handshake(conn: AgentConnection) -> BaseException | dict[str, Any]:
    await conn.handshake(timeout=2)
    return await outcome(conn.call(STAT, timeout=2))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=300))
def test_random_garbage_after_hello(tmp_path: Path, garbage: bytes) -> None:
    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    SandvmError | None]:
        res = await _call_after_handshake(conn)
        return res, conn.failure

    (res, failure), _ = run(run_case(tmp_path, _garbage_guest(garbage), host))
    assert isinstance(res, AgentProtocolError | AgentDisconnected | AgentTimeout), repr(res)
    if isinstance(res, AgentProtocolError):
        assert isinstance(failure, AgentProtocolError)
    if isinstance(res, AgentDisconnected):
        assert failure is res


# Structured garbage: frames with a valid header (so the dispatcher, not only the
# decoder, is exercised) and payloads that are sometimes meaningful.
_payloads = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b"{}", b"[]", b"null", b"\x00", b"\x01out", b"\x02err", b"\x03x",
                     struct.pack(">I", 1), struct.pack(">I", 0), struct.pack(">I", 1 << 30),
                     b'{"code":"file_not_found","message":"m"}', b'{"code":5}',
                     b'{"event":"started"}']),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5) | st.none(),
                    max_size=3).map(lambda d: wire.encode_json(wire.REPLY, 0, d)[10:]),
)
_frames = st.tuples(
    st.sampled_from(sorted(wire.FRAME_NAMES)),
    st.sampled_from([0, 1, 1, 1, 2, 3, 5, 0xFFFFFFFF]),
    _payloads,
).map(lambda f: wire.encode(*f))
_structured = st.tuples(st.lists(_frames, max_size=6), st.binary(max_size=12)).map(
    lambda t: b"".join(t[0]) + t[1])


@settings(max_examples=75, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=_structured)
def test_structured_garbage_after_hello(tmp_path: Path, garbage: bytes) -> None:
    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    SandvmError | None]:
        await conn.handshake(timeout=2)
        # the guest closes right after the garbage, so 0.5 s is ample for any answer
        res = await outcome(conn.call(STAT, timeout=0.5))
        return res, conn.failure

    (res, failure), _ = run(run_case(tmp_path, _garbage_guest(garbage), host))
    # a well-formed REPLY or RESET on stream 1 is a legitimate answer; anything else
    # must be a protocol error or a disconnect
    allowed = (dict, AgentProtocolError, AgentDisconnected, GuestError, CommandNotFound,
               InvalidPath)
    if isinstance(res, AgentTimeout):
        # tolerated only when the garbage was harmless (the guest merely stayed
        # silent): a connection that failed must have woken the call
        assert failure is None, (res, failure)
    else:
        assert isinstance(res, allowed), repr(res)
    assert failure is None or isinstance(failure, AgentProtocolError | AgentDisconnected)


# ------------------------------------------------------------------ hostile frames


def test_four_gib_header_fails_without_waiting_for_payload(tmp_path: Path) -> None:
    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        await g.send(struct.pack(">BBII", wire.MAGIC, wire.REPLY, 1, 0xFFFFFFFF))
        # no payload follows: the host must give up on the header alone and hang up
        return await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any], float]:
        loop = asyncio.get_running_loop()
        await conn.handshake(timeout=2)
        t0 = loop.time()
        # a long call timeout: only the header check can end this call quickly
        res = await outcome(conn.call(STAT, timeout=30))
        return res, loop.time() - t0

    (res, elapsed), hung_up = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError), res
    assert "exceeds" in str(res)
    assert elapsed < 2.0
    assert hung_up, "the host did not close the channel after the violation"


def test_truncated_frame_then_close(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        frame = wire.encode_json(wire.REPLY, 1, {"ok": True})
        await g.send(frame[:-3])
        # return: the harness closes the socket mid-frame

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    SandvmError | None]:
        res = await _call_after_handshake(conn)
        return res, conn.failure

    (res, failure), _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentDisconnected), res
    assert failure is res


def test_truncated_header_then_close(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode_json(wire.REPLY, 1, {"ok": True})[:5])

    res, _ = run(run_case(tmp_path, guest, _call_after_handshake))
    assert isinstance(res, AgentDisconnected), res


@pytest.mark.parametrize("sid", [2, 4, 0xFFFFFFFE, 7, 0xFFFFFFFF],
                         ids=["even2", "even4", "even-max", "odd-unopened", "odd-max"])
@pytest.mark.parametrize("ftype", [wire.REPLY, wire.DATA, wire.RESET, wire.WINDOW],
                         ids=["REPLY", "DATA", "RESET", "WINDOW"])
def test_frame_for_unknown_stream(tmp_path: Path, sid: int, ftype: int) -> None:
    payload = {wire.REPLY: b"{}", wire.DATA: b"\x01x", wire.RESET: b'{"code":"x"}',
               wire.WINDOW: struct.pack(">I", 10)}[ftype]

    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(ftype, sid, payload))
        return await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    SandvmError | None]:
        res = await _call_after_handshake(conn)
        return res, conn.failure

    (res, failure), hung_up = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError), res
    assert "unknown stream" in str(res)
    assert failure is res
    assert hung_up


def test_late_frame_for_finished_stream_is_ignored(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode_json(wire.REPLY, 1, {"n": 1}))
        # stragglers for the finished stream 1, then the answer on stream 3
        await g.send(wire.encode_data(1, wire.CH_STDOUT, b"late"))
        await g.expect_open(3)
        await g.send(wire.encode_json(wire.REPLY, 3, {"n": 3}))
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> list[dict[str, Any]]:
        await conn.handshake(timeout=2)
        out = [await conn.call(STAT, timeout=2)]
        out.append(await conn.call(STAT, timeout=2))
        assert conn.failure is None
        return out

    res, _ = run(run_case(tmp_path, guest, host))
    assert res == [{"n": 1}, {"n": 3}]


@pytest.mark.parametrize("ftype", [wire.OPEN, wire.PING, wire.CTRL, wire.REPLY, wire.DATA],
                         ids=["OPEN", "PING", "CTRL", "REPLY", "DATA"])
def test_unexpected_frame_on_stream_zero(tmp_path: Path, ftype: int) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode_json(ftype, 0, {"x": 1}))
        assert await g.host_hangs_up()

    res, _ = run(run_case(tmp_path, guest, _call_after_handshake))
    assert isinstance(res, AgentProtocolError), res


def test_ctrl_from_guest_on_open_stream(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode_json(wire.CTRL, 1, {"signal": 9}))
        assert await g.host_hangs_up()

    res, _ = run(run_case(tmp_path, guest, _call_after_handshake))
    assert isinstance(res, AgentProtocolError), res


def test_goaway_disconnects(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.GOAWAY, 0))
        assert await g.host_hangs_up()

    res, _ = run(run_case(tmp_path, guest, _call_after_handshake))
    assert isinstance(res, AgentDisconnected), res
    assert "going away" in str(res)


_OVERSIZED_JSON = b'{"p":"' + b"x" * wire.MAX_JSON + b'"}'  # fits a frame, not a control msg

BAD_FINAL_FRAMES = [
    pytest.param(wire.REPLY, b"not json", "not JSON", id="reply-text"),
    pytest.param(wire.REPLY, b"[]", "not a JSON object", id="reply-array"),
    pytest.param(wire.REPLY, b"42", "not a JSON object", id="reply-number"),
    pytest.param(wire.REPLY, b"\xff\xff", "not JSON", id="reply-bad-utf8"),
    pytest.param(wire.REPLY, b"", "not JSON", id="reply-empty"),
    pytest.param(wire.REPLY, _OVERSIZED_JSON, "exceeds", id="reply-oversized"),
    pytest.param(wire.RESET, b"boom", "not JSON", id="reset-text"),
    pytest.param(wire.RESET, b"[1]", "not a JSON object", id="reset-array"),
]

# Regression: _dispatch used to unregister the stream before decoding a REPLY/RESET
# payload, so a bad payload failed the connection without waking the pending call.


def _bad_final_guest(ftype: int, payload: bytes) -> GuestScript:
    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(ftype, 1, payload))
        return await g.host_hangs_up()

    return guest


@pytest.mark.parametrize(("ftype", "payload", "why"), BAD_FINAL_FRAMES)
def test_final_frame_not_json_object_fails_connection(
        tmp_path: Path, ftype: int, payload: bytes, why: str) -> None:
    async def host(conn: AgentConnection) -> SandvmError | None:
        await conn.handshake(timeout=2)
        await outcome(conn.call(STAT, timeout=0.5))
        return conn.failure

    failure, hung_up = run(run_case(tmp_path, _bad_final_guest(ftype, payload), host))
    assert isinstance(failure, AgentProtocolError), failure
    assert why in str(failure)
    assert hung_up


@pytest.mark.parametrize(("ftype", "payload", "why"), BAD_FINAL_FRAMES)
def test_final_frame_not_json_object_raises_protocol_error(
        tmp_path: Path, ftype: int, payload: bytes, why: str) -> None:
    async def host(conn: AgentConnection) -> BaseException | dict[str, Any]:
        await conn.handshake(timeout=2)
        # 0.5 s is plenty: the violation arrives right after the OPEN
        return await outcome(conn.call(STAT, timeout=0.5))

    res, _ = run(run_case(tmp_path, _bad_final_guest(ftype, payload), host))
    assert isinstance(res, AgentProtocolError), res
    assert why in str(res)


def test_reply_deeply_nested_json(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.REPLY, 1, b"[" * 100_000))
        assert await g.host_hangs_up(timeout=3)

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    SandvmError | None]:
        await conn.handshake(timeout=2)
        res = await outcome(conn.call(STAT, timeout=1))
        return res, conn.failure

    (res, failure), _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError), res
    assert failure is res


@pytest.mark.parametrize("payload", [b"", b"\x03data", b"\xffx"], ids=["empty", "ch3", "ch255"])
def test_data_with_bad_channel(tmp_path: Path, payload: bytes) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.DATA, 1, payload))
        assert await g.host_hangs_up()

    res, _ = run(run_case(tmp_path, guest, _call_after_handshake))
    assert isinstance(res, AgentProtocolError), res


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00", struct.pack(">I", 0),
                                     struct.pack(">I", 0xFFFFFFFF)],
                         ids=["empty", "short", "zero", "huge"])
def test_bad_window_frame(tmp_path: Path, payload: bytes) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.WINDOW, 1, payload))
        assert await g.host_hangs_up()

    res, _ = run(run_case(tmp_path, guest, _call_after_handshake))
    assert isinstance(res, AgentProtocolError), res


def test_window_credit_overflow(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode_window(1, 1 << 30) * 3)  # > 2**31 of credit in total
        assert await g.host_hangs_up()

    res, _ = run(run_case(tmp_path, guest, _call_after_handshake))
    assert isinstance(res, AgentProtocolError), res
    assert "absurd" in str(res)


# ------------------------------------------------------------------ flow control


def _data_frames(sid: int, total: int) -> bytes:
    out = []
    while total > 0:
        n = min(total, wire.DATA_CHUNK)
        out.append(wire.encode_data(sid, wire.CH_STDOUT, b"d" * n))
        total -= n
    return b"".join(out)


async def _drain(stream: Any) -> list[Any]:
    items = []
    while True:
        item = await stream.next(2)
        items.append(item)
        if item.kind in ("reply", "error"):
            return items


def test_data_beyond_window_is_a_protocol_error(tmp_path: Path) -> None:
    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        with contextlib.suppress(ConnectionError):
            await g.send(_data_frames(1, wire.INITIAL_WINDOW + 1))
        return await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[SandvmError | None, list[Any]]:
        await conn.handshake(timeout=2)
        stream = await conn.open({"op": "read_file", "path": "/big"})
        # consume nothing (no credit returned) until the guest sees us hang up
        while conn.failure is None:
            await asyncio.sleep(0.01)
        return conn.failure, await _drain(stream)

    (failure, items), hung_up = run(run_case(tmp_path, guest, host))
    assert isinstance(failure, AgentProtocolError)
    assert "window" in str(failure)
    assert hung_up
    assert items[-1].kind == "error" and items[-1].error is failure
    received = sum(len(i.data) for i in items if i.kind == "data")
    assert received <= wire.INITIAL_WINDOW


def test_data_exactly_filling_window_is_fine(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(_data_frames(1, wire.INITIAL_WINDOW))
        await g.send(wire.encode_json(wire.REPLY, 1, {"size": wire.INITIAL_WINDOW}))
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[list[Any], SandvmError | None]:
        await conn.handshake(timeout=2)
        stream = await conn.open({"op": "read_file", "path": "/big"})
        # let every frame arrive before consuming anything (no credit handed back)
        while not stream.closed:
            await asyncio.sleep(0.01)
        return await _drain(stream), conn.failure

    (items, failure), _ = run(run_case(tmp_path, guest, host))
    assert failure is None
    assert items[-1].kind == "reply" and items[-1].message == {"size": wire.INITIAL_WINDOW}
    assert sum(len(i.data) for i in items if i.kind == "data") == wire.INITIAL_WINDOW


def test_window_credit_refilled_by_consumption(tmp_path: Path) -> None:
    total = wire.INITIAL_WINDOW + 3 * wire.DATA_CHUNK

    async def guest(g: Guest) -> int:
        await g.handshake()
        await g.expect_open(1)
        await g.send(_data_frames(1, wire.INITIAL_WINDOW))
        credit = 0
        while credit < total - wire.INITIAL_WINDOW:
            sid, payload = await g.expect(wire.WINDOW)
            assert sid == 1
            credit += wire.decode_window(payload)
        await g.send(_data_frames(1, total - wire.INITIAL_WINDOW))
        await g.send(wire.encode_json(wire.REPLY, 1, {}))
        assert await g.host_hangs_up()
        return credit

    async def host(conn: AgentConnection) -> tuple[int, SandvmError | None]:
        await conn.handshake(timeout=2)
        stream = await conn.open({"op": "read_file", "path": "/big"})
        items = await _drain(stream)
        assert items[-1].kind == "reply"
        return sum(len(i.data) for i in items if i.kind == "data"), conn.failure

    (got, failure), credit = run(run_case(tmp_path, guest, host))
    assert got == total
    assert failure is None
    assert credit >= total - wire.INITIAL_WINDOW


@pytest.mark.parametrize("frame", [
    wire.encode_data(1, wire.CH_STDOUT, b"x"),
    wire.encode(wire.EOF, 1, b"\x01"),
    wire.encode_json(wire.EVENT, 1, {"event": "x"}),
], ids=["DATA", "EOF", "EVENT"])
def test_unexpected_item_on_one_shot_call_closes_channel(tmp_path: Path, frame: bytes) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(frame)
        await g.host_hangs_up(timeout=1)

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    SandvmError | None]:
        res = await _call_after_handshake(conn)
        return res, conn.failure

    (res, failure), _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentProtocolError), res
    assert failure is res


# ------------------------------------------------------------------ guest errors


@pytest.mark.parametrize(("code", "cls"), [
    ("file_not_found", GuestFileNotFound),
    ("file_exists", GuestFileExists),
    ("permission_denied", GuestPermissionDenied),
    ("file_too_large", FileTooLarge),
    ("command_not_found", CommandNotFound),
    ("invalid_path", InvalidPath),
    ("no_such_code", GuestError),
    ("", GuestError),
])
def test_reset_maps_to_error(tmp_path: Path, code: str, cls: type[SandvmError]) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode_json(wire.RESET, 1, {"code": code, "message": "x"}))
        # the connection survives a guest error: a second call works
        await g.expect_open(3)
        await g.send(wire.encode_json(wire.REPLY, 3, {"ok": True}))
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    dict[str, Any]]:
        res = await _call_after_handshake(conn)
        again = await conn.call(STAT, timeout=2)
        assert conn.failure is None
        return res, again

    (res, again), _ = run(run_case(tmp_path, guest, host))
    assert type(res) is cls, repr(res)
    assert isinstance(res, SandvmError)
    assert res.message == "x"
    assert res.details == {"guest_code": code}
    assert again == {"ok": True}


@pytest.mark.parametrize("msg", [
    {}, {"code": 5}, {"code": None, "message": 7}, {"code": ["file_not_found"]},
    {"message": "m" * 5000},
])
def test_guest_error_tolerates_hostile_reset(msg: dict[str, Any]) -> None:
    err = guest_error(msg)
    assert type(err) is GuestError
    assert isinstance(err, AgentError)
    assert 0 < len(err.message) <= 2000
    assert err.details == {"guest_code": None}


# ------------------------------------------------------------------ after failure


def test_calls_after_failure_fail_fast(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.send(b"\x00" * wire.HEADER_SIZE)  # bad magic
        await g.host_hangs_up()

    async def host(conn: AgentConnection) -> list[BaseException | Any]:
        await conn.handshake(timeout=2)
        while conn.failure is None:
            await asyncio.sleep(0.01)
        return [await outcome(conn.call(STAT, timeout=2)),
                await outcome(conn.open(STAT)),
                await outcome(conn.ping(timeout=2))]

    res, _ = run(run_case(tmp_path, guest, host))
    assert all(isinstance(r, AgentProtocolError) for r in res), res
    assert "magic" in str(res[0])


def test_ping_pong(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        sid, token = await _expect_ping(g)
        assert sid == 0
        await g.send(wire.encode(wire.PONG, 0, b"unsolicited"))  # ignored
        await g.send(wire.encode(wire.PONG, 0, token))
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> float:
        await conn.handshake(timeout=2)
        rtt = await conn.ping(timeout=2)
        assert conn.failure is None
        return rtt

    rtt, _ = run(run_case(tmp_path, guest, host))
    assert 0 <= rtt < 2


async def _expect_ping(g: Guest) -> tuple[int, bytes]:
    while True:
        t, sid, payload = await g.recv()
        if t == wire.PING:
            return sid, payload


def test_ping_timeout(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await _expect_ping(g)
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> BaseException | float:
        await conn.handshake(timeout=2)
        return await outcome(conn.ping(timeout=0.2))

    res, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentTimeout), res


def test_call_timeout_resets_stream(tmp_path: Path) -> None:
    async def guest(g: Guest) -> dict[str, Any]:
        await g.handshake()
        await g.expect_open(1)
        sid, payload = await g.expect(wire.RESET)  # the host abandons the stream
        assert sid == 1
        # the host ignores the late reply and the connection stays usable
        await g.send(wire.encode_json(wire.REPLY, 1, {"late": True}))
        await g.expect_open(3)
        await g.send(wire.encode_json(wire.REPLY, 3, {"ok": True}))
        assert await g.host_hangs_up()
        return wire.decode_json(payload)

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any],
                                                    dict[str, Any]]:
        await conn.handshake(timeout=2)
        res = await outcome(conn.call(STAT, timeout=0.2))
        return res, await conn.call(STAT, timeout=2)

    (res, again), reset = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentTimeout), res
    assert again == {"ok": True}
    assert reset == {"code": "cancelled"}


# ------------------------------------------------------------------ review regressions


def _stream_guest(*frames: bytes) -> GuestScript:
    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        for f in frames:
            await g.send(f)
        return await g.host_hangs_up()

    return guest


async def _open_and_drain(conn: AgentConnection) -> BaseException | None:
    await conn.handshake(timeout=2)
    st = await conn.open({"op": "exec", "argv": ["x"]})
    while True:
        try:
            item = await st.next(2)
        except BaseException as exc:  # noqa: BLE001
            return exc
        if item.kind == "error":
            return item.error


def test_unread_event_flood_closes_the_connection(tmp_path: Path) -> None:
    flood = [wire.encode_json(wire.EVENT, 1, {"e": i}) for i in range(5000)]

    async def host(conn: AgentConnection) -> SandvmError | None:
        await conn.handshake(timeout=2)
        await conn.open({"op": "exec", "argv": ["x"]})  # and never read it
        for _ in range(100):
            if conn.failure is not None:
                break
            await asyncio.sleep(0.02)
        return conn.failure

    err, hung_up = run(run_case(tmp_path, _stream_guest(*flood), host))
    assert isinstance(err, AgentProtocolError) and "flooded" in str(err)
    assert hung_up


@pytest.mark.parametrize(("frames", "why"), [
    ([wire.encode(wire.EOF, 1, b"\x01")] * 2, "second EOF"),
    ([wire.encode(wire.EOF, 1, b"\x01"), wire.encode_data(1, 1, b"late")], "after EOF"),
    ([wire.encode(wire.DATA, 1, b"\x01")], "empty DATA"),
], ids=["double-eof", "data-after-eof", "empty-data"])
def test_hostile_stream_items_close_the_connection(
        tmp_path: Path, frames: list[bytes], why: str) -> None:
    err, hung_up = run(run_case(tmp_path, _stream_guest(*frames), _open_and_drain))
    assert isinstance(err, AgentProtocolError), err
    assert why in str(err)
    assert hung_up


def test_guest_that_stops_reading_times_out_the_writer(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode_window(1, 1 << 29))  # plenty of credit, then never read
        await asyncio.sleep(BOUND)

    async def host(conn: AgentConnection) -> BaseException | None:
        await conn.handshake(timeout=2)
        conn.write_timeout = 0.5
        st = await conn.open({"op": "exec", "argv": ["cat"], "stdin": True})
        await asyncio.sleep(0.2)  # let the WINDOW arrive
        try:
            await st.send_data(b"x" * (64 << 20), timeout=2)
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None

    err, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(err, AgentTimeout), err
    assert "stopped reading" in str(err)


def test_reset_wakes_the_reader(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.expect(wire.RESET)

    async def host(conn: AgentConnection) -> BaseException | None:
        await conn.handshake(timeout=2)
        st = await conn.open({"op": "exec", "argv": ["sleep"]})
        waiter = asyncio.ensure_future(st.next(None))
        await asyncio.sleep(0.05)
        await st.reset()
        item = await asyncio.wait_for(waiter, 1)
        return item.error

    err, _ = run(run_case(tmp_path, guest, host))
    assert isinstance(err, AgentError) and "cancelled" in str(err)


def test_oversized_request_is_invalid_spec_and_leaks_no_stream(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await asyncio.sleep(0.5)

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any], int]:
        await conn.handshake(timeout=2)
        res = await outcome(conn.open({"op": "exec", "shell": "x" * (wire.MAX_JSON + 1)}))
        return res, len(conn._streams)

    (res, open_streams), _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, InvalidSpec) and "files.write" in str(res)
    assert open_streams == 0


def test_agent_restart_fails_open_operations(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.hello(instance="one")
        await g.expect(wire.HELLO)
        await g.expect_open(1)
        await g.hello(instance="two")  # a new agent process
        await asyncio.sleep(0.5)

    async def host(conn: AgentConnection) -> tuple[BaseException | dict[str, Any], str]:
        await conn.handshake(timeout=2)
        res = await outcome(conn.call(STAT, timeout=2))
        assert conn.info is not None
        return res, conn.info.instance

    (res, instance), _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentError) and "restarted" in str(res)
    assert instance == "two"


# ------------------------------------------------------------------ bytes, not items (issue 14)


def _dict_event(sid: int, n: int) -> bytes:
    """An EVENT of ~3n bytes that decodes to ~72n bytes of Python objects."""
    return wire.encode_json(wire.EVENT, sid, {"e": [{}] * n})


MIB_EVENT = 15_000  # dicts: 45 KB on the wire, ~1.1 MB decoded


async def _send_until_hung_up(g: Guest, frames: list[bytes]) -> bool:
    """Send the frames; True once the host has closed the channel (mid-way or after)."""
    try:
        for f in frames:
            await g.send(f)
        async with asyncio.timeout(BOUND):
            while await g.reader.read(1 << 16):
                pass
    except ConnectionError:  # a reset is a hang-up too
        return True
    except TimeoutError:
        return False
    return True


def _flood_guest(frames: list[bytes]) -> GuestScript:
    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        return await _send_until_hung_up(g, frames)

    return guest


async def _failure_within(conn: AgentConnection, seconds: float = 3.0) -> SandvmError | None:
    """Poll (never sleep blindly) until the connection fails or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while conn.failure is None and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return conn.failure


def test_unread_stream_is_bounded_in_bytes_not_items(tmp_path: Path) -> None:
    # 40 events are far below the count cap (4096) but hold ~44 MB decoded
    flood = [_dict_event(1, MIB_EVENT)] * 40

    async def host(conn: AgentConnection) -> tuple[SandvmError | None, int]:
        await conn.handshake(timeout=2)
        await conn.open({"op": "exec", "argv": ["x"]})  # and never read it
        return await _failure_within(conn), conn._queued_bytes

    (err, queued), hung_up = run(run_case(tmp_path, _flood_guest(flood), host))
    assert isinstance(err, AgentProtocolError) and "flooded stream 1" in str(err), err
    assert "MiB unread" in str(err)
    assert queued == 0  # everything it held was let go with the connection
    assert hung_up


def test_unread_streams_are_bounded_per_connection(tmp_path: Path) -> None:
    # 6 streams x ~6.5 MB: each under the per-stream cap, together over the connection's
    sids = [1, 3, 5, 7, 9, 11]

    async def guest(g: Guest) -> bool:
        await g.handshake()
        for sid in sids:
            await g.expect_open(sid)
        return await _send_until_hung_up(g, [_dict_event(sid, MIB_EVENT) for sid in sids
                                             for _ in range(6)])

    async def host(conn: AgentConnection) -> SandvmError | None:
        await conn.handshake(timeout=2)
        for _ in sids:
            await conn.open({"op": "exec", "argv": ["x"]})
        return await _failure_within(conn)

    err, hung_up = run(run_case(tmp_path, guest, host))
    assert isinstance(err, AgentProtocolError) and "flooded the channel" in str(err), err
    assert hung_up


def test_one_event_decoding_to_megabytes_is_refused(tmp_path: Path) -> None:
    big = _dict_event(1, 87_000)  # within MAX_JSON on the wire, ~6 MB decoded
    assert len(big) <= wire.MAX_JSON + wire.HEADER_SIZE
    err, hung_up = run(run_case(tmp_path, _flood_guest([big]), _open_and_drain))
    assert isinstance(err, AgentProtocolError) and "MiB of objects" in str(err), err
    assert hung_up


def test_deeply_nested_event_is_refused(tmp_path: Path) -> None:
    deep = wire.encode(wire.EVENT, 1, b'{"e":' + b"[" * 40 + b"]" * 40 + b"}")
    err, hung_up = run(run_case(tmp_path, _flood_guest([deep]), _open_and_drain))
    assert isinstance(err, AgentProtocolError) and "nested deeper" in str(err), err
    assert hung_up


def test_events_read_as_they_come_never_hit_the_byte_cap(tmp_path: Path) -> None:
    # ~12 MB of events in total (over the per-stream cap) on a stream that is read
    frames = [wire.encode_json(wire.EVENT, 1, {"e": "x" * 200_000})] * 60

    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        for f in frames:
            await g.send(f)
        await g.send(wire.encode_json(wire.REPLY, 1, {"done": True}))
        return await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[int, dict[str, Any] | None, int]:
        await conn.handshake(timeout=2)
        st = await conn.open({"op": "exec", "argv": ["x"]})
        events = 0
        while True:
            item = await st.next(2)
            if item.kind != "event":
                break
            events += 1
        assert conn.failure is None, conn.failure
        return events, item.message, conn._queued_bytes

    (events, reply, queued), _ = run(run_case(tmp_path, guest, host))
    assert events == 60 and reply == {"done": True}
    assert queued == 0  # read items and finished streams give their bytes back


# ------------------------------------------------------------------ versions (issue 14)


@pytest.mark.parametrize("override", [
    {"version": wire.PROTOCOL_VERSION - 1},
    {"version": wire.PROTOCOL_VERSION + 1},
    {"features": ["exec", "files"]},
    {"features": None},
], ids=["older", "newer", "missing-features", "no-features"])
def test_agent_of_another_build_is_a_version_mismatch(
        tmp_path: Path, override: dict[str, Any]) -> None:
    async def guest(g: Guest) -> None:
        await g.hello(agent_version="0.1.0", **override)
        assert await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[BaseException | AgentInfo, Any]:
        return await outcome(conn.handshake(timeout=2)), conn.failure

    (res, failure), _ = run(run_case(tmp_path, guest, host))
    assert isinstance(res, AgentVersionMismatch), res
    assert res.code == "agent_version_mismatch" and failure is res
    assert "sandvm setup" in str(res) and "0.1.0" in str(res)
    if "features" in override:
        assert "files.stream" in str(res) and "flow-control" in str(res)
    else:
        assert f"protocol {override['version']}" in str(res)


# ------------------------------------------------------------------ numbers (issue 14)


async def _command_result(conn: AgentConnection) -> BaseException | CommandResult:
    await conn.handshake(timeout=2)
    st = await conn.open({"op": "exec", "argv": ["x"]})
    h = AsyncCommandHandle(st, timeout=None, check=False, on_stdout=None, on_stderr=None,
                           stdin=None, stdin_open=False)
    return await outcome(h.wait())


@pytest.mark.parametrize("payload", [
    b'{"exit_code":0,"duration":1' + b"0" * 400 + b"}",
    b'{"exit_code":0,"duration":1e400}',
    b'{"exit_code":0,"duration":NaN}',
    b'{"exit_code":0,"duration":-Infinity}',
    b'{"exit_code":1' + b"0" * 5000 + b"}",
    b'{"exit_code":1' + b"0" * 400 + b"}",
    b'{"exit_code":true}',
    b'{"exit_code":0,"signal":"9"}',
    b'{"exit_code":0,"signal":1' + b"0" * 30 + b"}",
    b'{"exit_code":0,"duration":-1}',
    b'{"exit_code":0,"timed_out":1}',
    b'{"exit_code":-5}',
], ids=["dur-400-digits", "dur-1e400", "dur-nan", "dur-inf", "code-5000-digits",
        "code-400-digits", "code-bool", "sig-str", "sig-huge", "dur-negative", "timed-out-int",
        "code-negative"])
def test_hostile_exit_report_is_a_protocol_error(tmp_path: Path, payload: bytes) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.EVENT, 1, b'{"event":"started","pid":42}'))
        await g.send(wire.encode(wire.REPLY, 1, payload))
        await asyncio.sleep(0.3)

    res, _ = run(run_case(tmp_path, guest, _command_result))
    assert isinstance(res, AgentProtocolError), res


def test_sane_exit_report_still_reads(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.EVENT, 1, b'{"event":"started","pid":42}'))
        await g.send(wire.encode(wire.REPLY, 1, b'{"exit_code":137,"signal":9,'
                                                b'"timed_out":false,"duration":1.5}'))
        await asyncio.sleep(0.3)

    res, _ = run(run_case(tmp_path, guest, _command_result))
    assert isinstance(res, CommandResult), res
    assert (res.exit_code, res.signal, res.duration, res.timed_out) == (137, 9, 1.5, False)


def test_hostile_pid_in_start_event_is_a_protocol_error(tmp_path: Path) -> None:
    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.EVENT, 1, b'{"event":"started","pid":1' + b"0" * 400
                                 + b"}"))
        await g.send(wire.encode(wire.REPLY, 1, b'{"exit_code":0}'))
        await asyncio.sleep(0.3)

    res, _ = run(run_case(tmp_path, guest, _command_result))
    assert isinstance(res, AgentProtocolError), res


GOOD_ENTRY = {"path": "/a", "name": "a", "type": "file", "size": 1, "mode": 0o644,
              "mtime": 1.5, "uid": 0, "gid": 0}


@pytest.mark.parametrize("override", [
    {"mtime": 10 ** 400}, {"mtime": float("inf")}, {"size": 10 ** 400}, {"size": -1},
    {"size": "12"}, {"size": 1.0}, {"mode": 1 << 20}, {"uid": 1 << 40}, {"gid": True},
    {"path": 5}, {"name": "x" * 5000}, {"type": "fifo"}, {"target": ["x"]},
], ids=lambda o: next(iter(o)))
def test_hostile_file_entry_is_a_protocol_error(override: dict[str, Any]) -> None:
    with pytest.raises(AgentProtocolError):
        _entry({**GOOD_ENTRY, **override})
    assert _entry(GOOD_ENTRY).mtime == 1.5


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 500), max_value=10 ** 500)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids,
                                                              max_size=3),
    max_leaves=6)


@given(value=_json_values)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_typed_guest_reads_only_return_in_range_or_raise_protocol_errors(value: Any) -> None:
    msg = {"k": value}
    for read, check in (
        (lambda: guest_int(msg, "k", lo=0, hi=255), lambda v: type(v) is int and 0 <= v <= 255),
        (lambda: guest_opt_int(msg, "k", lo=1, hi=64),
         lambda v: v is None or (type(v) is int and 1 <= v <= 64)),
        (lambda: guest_float(msg, "k", hi=1e9, default=0.0),
         lambda v: type(v) is float and 0.0 <= v <= 1e9),
        (lambda: guest_str(msg, "k", max_len=10), lambda v: type(v) is str and len(v) <= 10),
        (lambda: guest_bool(msg, "k"), lambda v: type(v) is bool),
        (lambda: guest_list(msg, "k", max_len=2), lambda v: type(v) is list and len(v) <= 2),
    ):
        try:
            got = read()
        except AgentProtocolError:
            continue
        assert check(got), (value, got)


def test_tiny_data_frames_are_merged_while_unread(tmp_path: Path) -> None:
    # 20,000 one-byte DATA frames: credit allows them, but as 20,000 queued items they
    # would cost ~130 bytes each; merged they are one chunk
    text = bytes(65 + i % 26 for i in range(20_000))
    blob = b"".join(wire.encode_data(1, 1, text[i:i + 1]) for i in range(len(text)))

    async def guest(g: Guest) -> bool:
        await g.handshake()
        await g.expect_open(1)
        await g.send(blob)
        await g.send(wire.encode_json(wire.REPLY, 1, {"ok": True}))
        return await g.host_hangs_up()

    async def host(conn: AgentConnection) -> tuple[int, bytes, int]:
        await conn.handshake(timeout=2)
        st = await conn.open({"op": "exec", "argv": ["x"]})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while not st.closed and loop.time() < deadline:  # the reply arrived: all queued
            await asyncio.sleep(0.02)
        queued = len(st._items)
        got = b""
        while True:
            item = await st.next(2)
            if item.kind != "data":
                break
            got += item.data
        return queued, got, conn._queued_bytes

    (queued, got, left), hung_up = run(run_case(tmp_path, guest, host))
    assert got == text  # in order, nothing lost
    assert queued <= 2  # one merged chunk and the reply
    assert left == 0 and hung_up


def test_alternating_tiny_data_frames_are_bounded_in_bytes(tmp_path: Path) -> None:
    # 1-byte frames alternating stdout/stderr cannot be merged: each queued item is
    # charged its overhead, and 40,000 of them exceed the per-stream cap
    blob = b"".join(wire.encode_data(1, 1 + i % 2, b"x") for i in range(40_000))

    async def host(conn: AgentConnection) -> SandvmError | None:
        await conn.handshake(timeout=2)
        await conn.open({"op": "exec", "argv": ["x"]})  # never read
        return await _failure_within(conn)

    err, hung_up = run(run_case(tmp_path, _flood_guest([blob]), host))
    assert isinstance(err, AgentProtocolError) and "flooded stream 1" in str(err), err
    assert hung_up


def test_server_watcher_ends_a_command_whose_guest_lies_about_its_duration(
        tmp_path: Path) -> None:
    # the server's background-command watcher died of the OverflowError and left the
    # command "running" (holding a slot); now the command ends with a protocol error
    from sandvm.server.commands import BackgroundCommand

    async def guest(g: Guest) -> None:
        await g.handshake()
        await g.expect_open(1)
        await g.send(wire.encode(wire.REPLY, 1, b'{"exit_code":0,"duration":1' + b"0" * 400
                                 + b"}"))
        await asyncio.sleep(0.3)

    async def host(conn: AgentConnection) -> dict[str, Any] | None:
        await conn.handshake(timeout=2)
        st = await conn.open({"op": "exec", "argv": ["x"]})
        h = AsyncCommandHandle(st, timeout=None, check=False, on_stdout=None, on_stderr=None,
                               stdin=None, stdin_open=False)
        cmd = BackgroundCommand(command_id="c1", sandbox_id="s1", tenant="t", cmd="x",
                                max_buffer=1 << 20)
        cmd.watch(h)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while cmd.final is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return cmd.final

    final, _ = run(run_case(tmp_path, guest, host))
    assert final is not None and final["type"] == "error", final
    assert final["code"] == "agent_protocol_error"
