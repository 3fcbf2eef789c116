"""Public seams other modules (the server, the isolation runtime, the runtime manager)
use instead of private members: commands.start/run with on_output, files.write_stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sandvm import wire
from sandvm.errors import GuestError, InvalidSpec
from sandvm.sandbox import AsyncSandbox

pytestmark = pytest.mark.qemu


def test_commands_start_and_run_with_raw_output() -> None:
    async def main() -> None:
        async with await AsyncSandbox.create() as sb:
            got: list[tuple[int, bytes]] = []
            gate = asyncio.Event()

            async def slow(channel: int, data: bytes) -> None:
                await gate.wait()  # a coroutine: the output waits for it
                got.append((channel, data))

            h = await sb.commands.start("cat; printf err >&2", on_output=slow)
            assert h.pid is not None
            await h.send_stdin(b"in")  # stdin stays open without ``stdin=``
            await h.close_stdin()
            gate.set()
            res = await h.wait()
            assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""
            out = b"".join(d for c, d in got if c == wire.CH_STDOUT)
            err = b"".join(d for c, d in got if c == wire.CH_STDERR)
            assert (out, err) == (b"in", b"err")

            got.clear()
            res = await sb.commands.run("printf '\\377'; exit 3", check=False,
                                        on_output=lambda c, d: got.append((c, d)))
            assert res.exit_code == 3 and got == [(wire.CH_STDOUT, b"\xff")]

            with pytest.raises(InvalidSpec):
                await sb.commands.start("true", on_output=slow, on_stdout=print)

            # files.write_stream: chunks as they come, the file appears whole
            async def chunks() -> AsyncIterator[bytes]:
                for i in range(64):
                    yield bytes([i]) * 65536

            info = await sb.files.write_stream("/tmp/big", chunks(), mode=0o600)
            assert info.size == 64 * 65536
            data = await sb.files.read("/tmp/big", format="bytes", max_bytes=1 << 23)
            assert data == b"".join(bytes([i]) * 65536 for i in range(64))
            assert (await sb.commands.run("stat -c %a /tmp/big")).stdout == "600\n"

            class Broken(Exception):
                pass

            async def failing() -> AsyncIterator[bytes]:
                yield b"partial"
                raise Broken

            with pytest.raises(Broken):  # abandoned: the old content stays
                await sb.files.write_stream("/tmp/big", failing())
            assert (await sb.files.stat("/tmp/big")).size == 64 * 65536

            async def one() -> AsyncIterator[Any]:
                yield "text"

            with pytest.raises(InvalidSpec):
                await sb.files.write_stream("/tmp/x", one())
            with pytest.raises(GuestError):  # no parent, and none made
                await sb.files.write_stream("/tmp/no/such", chunks(), make_parents=False)

    asyncio.run(main())


def test_sync_twins_of_the_seams(sandbox: Any) -> None:
    got: list[tuple[int, bytes]] = []
    h = sandbox.commands.start("echo hi", on_output=lambda c, d: got.append((c, d)))
    assert h.wait().exit_code == 0 and got == [(wire.CH_STDOUT, b"hi\n")]
    info = sandbox.files.write_stream("/tmp/sync", iter([b"a", b"", b"bc"]))
    assert info.size == 3 and sandbox.files.read("/tmp/sync") == "abc"
