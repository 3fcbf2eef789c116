"""The shared process-output module (``sandvm.output``): the pipe (backpressure), the
log (drop the oldest), the end of a command as a result, an HTTP event and an exit
status. No VM."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sandvm.errors import CommandTimeout
from sandvm.output import (
    OutputLog,
    OutputPipe,
    exit_event,
    exit_status,
    output_event,
    wait_outcome,
)
from sandvm.values import CommandResult


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- the end


def test_wait_outcome_maps_a_timeout_to_its_result() -> None:
    res = CommandResult(exit_code=137, signal=9, duration=1.5)

    async def ok() -> CommandResult:
        return res

    async def timed_out(result: CommandResult | None) -> CommandResult:
        raise CommandTimeout("too slow", result=result)

    async def go() -> None:
        assert await wait_outcome(ok()) == (res, False)
        assert await wait_outcome(timed_out(res)) == (res, True)
        assert await wait_outcome(timed_out(None), need_result=False) == (None, True)
        with pytest.raises(CommandTimeout):  # the server's case: nothing to report
            await wait_outcome(timed_out(None))

    run(go())


def test_exit_event_is_the_http_apis_last_event() -> None:
    res = CommandResult(exit_code=3, signal=None, duration=0.12345678)
    assert exit_event(res, timed_out=False) == {
        "type": "exit", "exit_code": 3, "signal": None, "timed_out": False,
        "duration": 0.123457}


@pytest.mark.parametrize(("result", "timed_out", "want"), [
    (CommandResult(exit_code=0), False, (0, None)),
    (CommandResult(exit_code=7), False, (7, None)),
    (CommandResult(exit_code=143, signal=15), False, (143, 15)),
    (CommandResult(exit_code=137, signal=9), True, (137, 9)),  # the guest said which
    (CommandResult(exit_code=1), True, (137, 9)),  # a timeout is a kill
    (None, True, (137, 9)),  # timed out, result unknown
    (None, False, (0, None)),  # ended by an error: no status
    (CommandResult(exit_code=999), False, (255, None)),  # a lying guest, clamped
    (CommandResult(exit_code=-5, signal=99), False, (0, None)),
    (CommandResult(exit_code=0, signal=70), True, (198, None)),
])
def test_exit_status_follows_the_128_plus_signal_convention(
        result: CommandResult | None, timed_out: bool, want: tuple[int, int | None]) -> None:
    assert exit_status(result, timed_out=timed_out) == want


def test_output_event_is_text_or_base64() -> None:
    assert output_event(1, b"hi") == {"type": "stdout", "text": "hi"}
    assert output_event(2, "é".encode()[:1]) == {"type": "stderr", "b64": "ww=="}


# ---------------------------------------------------------------------------- the pipe


def test_pipe_full_in_bytes_is_backpressure_and_never_holds_more() -> None:
    async def go() -> None:
        pipe = OutputPipe(max_bytes=4)
        writer = asyncio.ensure_future(pipe.put(1, b"abcdef"))
        await asyncio.sleep(0)
        assert not writer.done() and pipe.buffered == 4  # split to fill it exactly
        assert pipe.take(100) == (b"abcd", b"")
        await asyncio.wait_for(writer, 2)
        assert pipe.buffered == 2
        assert await pipe.get() == (1, b"ef")
        assert not await pipe.wait_data(0.01)  # nothing, not closed

    run(go())


def test_pipe_full_in_chunks_and_order_kept() -> None:
    async def go() -> None:
        pipe = OutputPipe(max_chunks=2)
        await pipe.put(1, b"a")
        await pipe.put(2, b"b")
        third = asyncio.ensure_future(pipe.put(1, b"c"))
        await asyncio.sleep(0)
        assert not third.done()
        assert await pipe.get() == (1, b"a")
        await asyncio.wait_for(third, 2)
        assert [await pipe.get(), await pipe.get()] == [(2, b"b"), (1, b"c")]

    run(go())


def test_pipe_take_gives_stdout_first_within_the_size() -> None:
    async def go() -> None:
        pipe = OutputPipe(max_bytes=100)
        for ch, data in ((2, b"E1"), (1, b"out1"), (2, b"E2"), (1, b"out2")):
            await pipe.put(ch, data)
        assert pipe.take(6) == (b"out1ou", b"")
        assert pipe.take(5) == (b"t2", b"E1E")
        assert pipe.buffered == 1 and pipe.take(5) == (b"", b"2")
        assert pipe.buffered == 0

    run(go())


def test_closing_the_pipe_frees_a_waiting_writer_and_ends_readers() -> None:
    async def go() -> None:
        pipe = OutputPipe(max_bytes=2)
        writer = asyncio.ensure_future(pipe.put(1, b"abcd"))
        reader_done = asyncio.Event()

        async def read_all() -> list[tuple[int, bytes]]:
            got = []
            while (chunk := await pipe.get()) is not None:
                got.append(chunk)
            reader_done.set()
            return got

        await asyncio.sleep(0)
        pipe.close()  # the command ended: what is left goes in at once
        await asyncio.wait_for(writer, 2)
        got = await asyncio.wait_for(read_all(), 2)
        assert b"".join(d for _, d in got) == b"abcd"
        assert pipe.closed and await pipe.wait_data(5)  # closed: returns at once

    run(go())


def test_pipe_wants_room() -> None:
    with pytest.raises(ValueError, match="room"):
        OutputPipe(max_bytes=0)


# ---------------------------------------------------------------------------- the log


def test_log_drops_the_oldest_over_its_event_cap_and_keeps_the_last() -> None:
    async def go() -> None:
        log = OutputLog(max_bytes=1 << 20, max_events=3)
        for i in range(5):
            assert log.append({"type": "stdout", "text": str(i)}, 1)
        assert (log.first_seq, log.next_seq, log.dropped) == (2, 5, True)
        assert log.append({"type": "error", "code": "x"})
        assert not log.append({"type": "stdout", "text": "late"}, 4)
        seqs = [e["seq"] async for e in log.follow(0)]
        assert seqs == [3, 4, 5] and log.final is not None and log.final["seq"] == 5

    run(go())


def test_log_follower_wakes_for_new_events() -> None:
    async def go() -> None:
        log = OutputLog(max_bytes=10)
        follower = log.follow(0)
        nxt = asyncio.ensure_future(follower.__anext__())
        await asyncio.sleep(0)
        assert not nxt.done()
        log.append({"type": "stdout", "text": "x"}, 1)
        assert (await asyncio.wait_for(nxt, 2))["seq"] == 0
        log.append({"type": "exit", "exit_code": 0})
        assert [e["type"] async for e in follower] == ["exit"]

    run(go())

