"""A command's output as it arrives, and how a command's end is reported.

The one place for process output, shared by the local command handles, the remote
SDK, the HTTP server and the isolation runtime:

- ``OutputBuffer``: one stream of a foreground command, kept up to ``OUTPUT_CAP``
  bytes (then ``truncated``) or handed to callbacks.
- ``OutputPipe``: output on its way to a slower reader, bounded; a full pipe is
  backpressure (the guest stops reading the command's pipes), so nothing is dropped.
- ``OutputLog``: a background command's events, numbered, bounded by dropping the
  oldest output; any number of followers read it from any ``seq``.
- ``wait_outcome``, ``exit_event``, ``exit_status``: a command's end (a timeout
  included) as a result, as the HTTP API's ``exit`` event, as a process table's
  exit code.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from sandvm.errors import CommandTimeout
from sandvm.values import OUTPUT_CAP, CommandResult, OutputCallback, RawOutputCallback

CH_STDOUT = 1  # as ``wire.CH_STDOUT``: raw output's channel numbers (anything else: stderr)
MAX_LOG_EVENTS = 4096  # an OutputLog's event cap besides its byte cap


class OutputBuffer:
    """One stream of a command's output: kept (up to OUTPUT_CAP bytes, then ``truncated``)
    and decoded for ``cb``, or passed raw to ``raw`` (then nothing is kept)."""

    def __init__(self, cb: OutputCallback | None, raw: RawOutputCallback | None = None,
                 channel: int = 0) -> None:
        self.buf = bytearray()
        self.cb = cb
        self.raw = raw
        self.channel = channel
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    async def feed(self, data: bytes) -> None:
        if self.raw is not None:  # the callback keeps the output: nothing kept here
            r = self.raw(self.channel, data)
            if asyncio.iscoroutine(r):
                await r
            return
        room = OUTPUT_CAP - len(self.buf)
        if room >= len(data):
            self.buf += data
        else:
            self.buf += data[:max(room, 0)]
            self.truncated = True
        if self.cb is not None:
            text = self._decoder.decode(data)
            if text:
                r = self.cb(text)
                if asyncio.iscoroutine(r):
                    await r

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")



# ---------------------------------------------------------------------------- the end


async def wait_outcome(wait: Awaitable[CommandResult], *, need_result: bool = True
                       ) -> tuple[CommandResult | None, bool]:
    """``(result, timed_out)`` of a command: what ``wait`` returns, or the result a
    ``CommandTimeout`` carries (``timed_out`` True). A timeout without a result is
    raised again, unless ``need_result`` is False (then the result is None). Raises
    what ``wait`` raises otherwise."""
    try:
        return await wait, False
    except CommandTimeout as exc:
        if exc.result is None and need_result:
            raise
        return exc.result, True


def exit_event(result: CommandResult, *, timed_out: bool) -> dict[str, Any]:
    """The HTTP API's last event of a command that ended (by itself, a signal or its
    timeout)."""
    return {"type": "exit", "exit_code": result.exit_code, "signal": result.signal,
            "timed_out": timed_out, "duration": round(result.duration, 6)}


def exit_status(result: CommandResult | None, *, timed_out: bool) -> tuple[int, int | None]:
    """``(exit_code, signal)`` as a process table reports them: a timeout is a kill
    (the signal the guest reports, else SIGKILL; exit code 128 + signal); the code
    kept within 0..255 and a signal outside 1..64 dropped (the guest is not
    trusted)."""
    code, sig = (result.exit_code, result.signal) if result is not None else (0, None)
    if timed_out:
        sig = sig if sig else 9
        code = 128 + sig
    code = max(0, min(255, code))
    if sig is not None and not 1 <= sig <= 64:
        sig = None
    return code, sig


def output_event(channel: int, data: bytes) -> dict[str, Any]:
    """One ``stdout``/``stderr`` event of the HTTP API: text if the chunk is valid
    UTF-8, else base64 (a chunk can end inside a character)."""
    kind = "stdout" if channel == CH_STDOUT else "stderr"
    try:
        return {"type": kind, "text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"type": kind, "b64": base64.b64encode(data).decode()}


# ---------------------------------------------------------------------------- buffers


class OutputPipe:
    """Raw output ``(channel, bytes)`` on its way from a command to a slower reader, in
    arrival order, bounded by ``max_bytes`` (a chunk is split to fill it exactly) and
    ``max_chunks`` (None: no such cap). A full pipe is backpressure: ``put`` waits for
    room, and while it waits the guest reads no more of the command's output, so
    nothing is dropped. ``close`` when the command ended: then ``put`` never waits,
    and readers get what is left, then the end.

    ``put`` is a raw-output callback (``commands.start(on_output=)``); read with
    ``get`` (chunk by chunk) or ``take`` (stdout, then stderr, up to a size)."""

    def __init__(self, *, max_bytes: int | None = None, max_chunks: int | None = None
                 ) -> None:
        if (max_bytes is not None and max_bytes < 1) or \
                (max_chunks is not None and max_chunks < 1):
            raise ValueError("an output pipe needs room for at least one byte and chunk")
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self._chunks: collections.deque[tuple[int, bytes]] = collections.deque()
        self._size = 0
        self._closed = False
        self._data = asyncio.Event()  # set: something to read, or closed
        self._room = asyncio.Event()  # set: room for more, or closed
        self._room.set()

    @property
    def buffered(self) -> int:
        """Bytes waiting to be read."""
        return self._size

    @property
    def closed(self) -> bool:
        """Whether the command ended (``close``)."""
        return self._closed

    def _full(self) -> bool:
        return (self.max_bytes is not None and self._size >= self.max_bytes) or \
            (self.max_chunks is not None and len(self._chunks) >= self.max_chunks)

    async def put(self, channel: int, data: bytes) -> None:
        """Add a chunk, waiting for room as long as the pipe is full and open."""
        view = memoryview(data)
        while view:
            while self._full() and not self._closed:
                self._room.clear()
                await self._room.wait()
            n = len(view)
            if not self._closed and self.max_bytes is not None:
                n = min(n, self.max_bytes - self._size)
            self._chunks.append((channel, bytes(view[:n])))
            self._size += n
            view = view[n:]
            self._data.set()

    def close(self) -> None:
        """The command ended: wake every waiter; ``put`` no longer waits."""
        self._closed = True
        self._data.set()
        self._room.set()

    def _consumed(self) -> None:
        if not self._full():
            self._room.set()
        if not self._chunks and not self._closed:
            self._data.clear()

    async def get(self) -> tuple[int, bytes] | None:
        """The oldest chunk, waiting for one; None once the pipe is closed and empty."""
        while not self._chunks:
            if self._closed:
                return None
            self._data.clear()
            await self._data.wait()
        channel, data = self._chunks.popleft()
        self._size -= len(data)
        self._consumed()
        return channel, data

    def take(self, max_bytes: int) -> tuple[bytes, bytes]:
        """``(stdout, stderr)`` read at once, at most ``max_bytes`` together (stdout
        first); never waits."""
        taken = {CH_STDOUT: bytearray(), 0: bytearray()}
        budget = max_bytes
        for want in (CH_STDOUT, 0):
            rest: collections.deque[tuple[int, bytes]] = collections.deque()
            for channel, data in self._chunks:
                mine = (channel == CH_STDOUT) == (want == CH_STDOUT)
                if mine and budget > 0:
                    n = min(len(data), budget)
                    taken[want] += data[:n]
                    budget -= n
                    if n < len(data):
                        rest.append((channel, data[n:]))
                else:
                    rest.append((channel, data))
            self._chunks = rest
        self._size -= max_bytes - budget
        self._consumed()
        return bytes(taken[CH_STDOUT]), bytes(taken[0])

    async def wait_data(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for something to read (or the end); returns
        whether there is something to read or the pipe is closed."""
        if not self._chunks and not self._closed and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._data.wait()), timeout)
        return bool(self._chunks) or self._closed


class OutputLog:
    """A background command's events (output chunks, then one ``exit`` or ``error``),
    each numbered by ``seq`` from 0, for any number of followers reading from any
    ``seq``. Over its caps (``max_bytes`` of output, ``max_events``) the oldest events
    are dropped: a follower asking for one of them gets the oldest kept instead, and
    sees the jump in ``seq``. The last event is always kept; nothing is added after
    it. Appending never waits (a command nobody follows is never held up)."""

    def __init__(self, *, max_bytes: int, max_events: int = MAX_LOG_EVENTS) -> None:
        self.max_bytes = max_bytes
        self.max_events = max_events
        self.final: dict[str, Any] | None = None  # the exit or error event, once ended
        self.dropped = False  # whether events were dropped
        self._events: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._first_seq = 0  # seq of _events[0]
        self._next_seq = 0
        self._buffered = 0
        self._changed = asyncio.Event()

    @property
    def first_seq(self) -> int:
        """The oldest ``seq`` kept."""
        return self._first_seq

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next event gets."""
        return self._next_seq

    def append(self, event: dict[str, Any], size: int = 0) -> bool:
        """Number ``event`` (of ``size`` output bytes) and keep it, dropping the oldest
        over the caps; an ``exit`` or ``error`` event is the last. Returns whether it
        was kept (False: the log had ended)."""
        if self.final is not None:
            return False
        event = {"seq": self._next_seq, **event}
        self._next_seq += 1
        self._events.append((event, size))
        self._buffered += size
        while len(self._events) > 1 and (self._buffered > self.max_bytes
                                         or len(self._events) > self.max_events):
            _, dropped = self._events.popleft()
            self._buffered -= dropped
            self._first_seq += 1
            self.dropped = True
        if event["type"] in ("exit", "error"):
            self.final = event
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def follow(self, offset: int, *, follow: bool = True
                     ) -> AsyncIterator[dict[str, Any]]:
        """The events from ``seq`` ``offset`` on (or the oldest kept, if those were
        dropped); with ``follow``, waits for more until the last. An offset past the
        end is the next event (the last, once there: always told)."""
        seq = min(offset, self._next_seq if self.final is None else self.final["seq"])
        while True:
            seq = max(seq, self._first_seq)
            idx = seq - self._first_seq
            if idx < len(self._events):
                event = self._events[idx][0]
                seq += 1
                yield event
                if event["type"] in ("exit", "error"):
                    return
                continue
            if self.final is not None or not follow:
                return
            await self._changed.wait()
