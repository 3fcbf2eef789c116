"""A command's output as it arrives: kept in memory up to a cap, or handed to callbacks.

Shared by the local command handles and the remote SDK.
"""

from __future__ import annotations

import asyncio
import codecs

from sandvm.values import OUTPUT_CAP, OutputCallback, RawOutputCallback


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

