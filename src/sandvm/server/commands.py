"""Background commands of the HTTP API: started without waiting, known by id.

A ``BackgroundCommand`` wraps the local ``AsyncCommandHandle`` of a command the server
started in the background. Its output goes into a bounded ``OutputLog`` of events
(``stdout``/``stderr`` chunks, then one ``exit`` or ``error``), each numbered by ``seq``
from 0; any number of HTTP clients follow it from any ``seq`` (a reconnecting client
passes the next one it wants). When the log is over its cap (bytes or events) the
oldest output events are dropped: a follower asking for one of them gets the oldest
kept instead, and sees the jump in ``seq``. The last event (the exit) is always kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sandvm.commands import AsyncCommandHandle
from sandvm.core import signal_number
from sandvm.errors import SandboxStateError, SandvmError, UnknownCommand
from sandvm.output import MAX_LOG_EVENTS, OutputLog, exit_event, wait_outcome
from sandvm.server.models import CommandInfo
from sandvm.server.redact import Redactor, default_redactor, status_for

MAX_BUFFERED_EVENTS = MAX_LOG_EVENTS  # besides the byte cap: tiny chunks cost per event too

__all__ = ["MAX_BUFFERED_EVENTS", "BackgroundCommand", "unknown_command"]


def unknown_command(command_id: str, sandbox_id: str) -> UnknownCommand:
    """The 404 for a command id the sandbox does not have."""
    return UnknownCommand(f"no command {command_id[:80]!r} in sandbox {sandbox_id}")


class BackgroundCommand:
    """One background command: its handle, its buffered events, its outcome."""

    def __init__(self, *, command_id: str, sandbox_id: str, tenant: str, cmd: str | list[str],
                 max_buffer: int) -> None:
        self.command_id = command_id
        self.sandbox_id = sandbox_id
        self.tenant = tenant
        self.cmd = cmd if isinstance(cmd, str) else " ".join(cmd)
        self.max_buffer = max_buffer
        self.started = time.time()
        self.ended: float | None = None
        self.handle: AsyncCommandHandle | None = None
        self.stdin_open = True
        self.log = OutputLog(max_bytes=max_buffer, max_events=MAX_BUFFERED_EVENTS)
        self._stdin_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ events

    @property
    def final(self) -> dict[str, Any] | None:
        """The ``exit`` or ``error`` event, once the command ended."""
        return self.log.final

    def append(self, event: dict[str, Any], size: int = 0) -> None:
        """Number ``event`` (``size`` bytes of output), keep it (dropping the oldest
        output over the caps), wake the followers. Ignored once the command ended."""
        if self.log.append(event, size) and self.log.final is not None:
            self.ended = time.time()

    def follow(self, offset: int, *, follow: bool = True) -> AsyncIterator[dict[str, Any]]:
        """The events from ``seq`` ``offset`` on (or the oldest kept, if those were
        dropped); with ``follow``, waits for more until the command ends. An offset
        past the end is the next event (the exit, once it ended: always told)."""
        return self.log.follow(offset, follow=follow)

    # ------------------------------------------------------------------ the command

    def watch(self, handle: AsyncCommandHandle, *,
              on_end: Callable[[BackgroundCommand], None] | None = None,
              explain: Callable[[SandvmError], Awaitable[SandvmError]] | None = None,
              redactor: Redactor | None = None) -> None:
        """Start waiting for ``handle``'s end; its exit (or error: ``explain`` may put
        another in its place; its message as ``redactor`` lets clients see it) becomes
        the last event."""
        self.handle = handle

        async def go() -> None:
            final: dict[str, Any]
            try:
                res, timed_out = await wait_outcome(handle.wait())
                assert res is not None  # a timeout without a result is raised
                final = exit_event(res, timed_out=timed_out)
            except SandvmError as exc:
                err = await explain(exc) if explain is not None else exc
                final = {"type": "error", **(redactor or default_redactor()).public(
                    err, status=status_for(err))}
            except asyncio.CancelledError:
                self.append({"type": "error", "code": "sandbox_state",
                             "message": "the server let go of the sandbox (it stopped, or"
                                        " the sandbox ended)"})
                raise
            self.append(final)
            if on_end is not None:
                on_end(self)

        self._watcher = asyncio.get_running_loop().create_task(go())

    async def close(self) -> None:
        """Stop watching (the server lets go of the sandbox): the command is abandoned."""
        if self.handle is not None and self.final is None:
            with contextlib.suppress(SandvmError):
                await self.handle.abandon()
        if self._watcher is not None and not self._watcher.done() and \
                self._watcher is not asyncio.current_task():  # not from its own end
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, SandvmError):
                await self._watcher

    def _running_handle(self) -> AsyncCommandHandle | None:
        if self.final is not None or self.handle is None:
            return None
        return self.handle

    async def send_stdin(self, data: bytes) -> None:
        """Raises SandboxStateError once the command ended or its stdin was closed."""
        async with self._stdin_lock:
            handle = self._running_handle()
            if handle is None:
                raise SandboxStateError(f"command {self.command_id} has ended")
            if not self.stdin_open:
                raise SandboxStateError(f"the stdin of command {self.command_id} is closed")
            if data:
                await handle.send_stdin(data)

    async def close_stdin(self) -> None:
        """End the command's stdin (a no-op once it ended or is closed)."""
        async with self._stdin_lock:
            handle = self._running_handle()
            if handle is not None and self.stdin_open:
                self.stdin_open = False
                await handle.close_stdin()

    async def send_signal(self, sig: int | str, *, grace: float | None = None) -> None:
        """Signal its process group (a no-op once it ended, as locally)."""
        number = signal_number(sig)
        handle = self._running_handle()
        if handle is not None:
            await handle.send_signal(number, grace=grace)

    def info(self) -> CommandInfo:
        f = self.final or {}
        state = "running" if self.final is None else (
            "exited" if f.get("type") == "exit" else "failed")
        return CommandInfo(
            command_id=self.command_id, sandbox_id=self.sandbox_id, cmd=self.cmd[:1024],
            state=state,  # type: ignore[arg-type]
            pid=self.handle.pid if self.handle is not None else None,
            started=self.started, ended=self.ended, exit_code=f.get("exit_code"),
            signal=f.get("signal"), timed_out=f.get("timed_out"),
            error_code=f.get("code"), error_message=f.get("message"),
            stdin_open=self.stdin_open and self.final is None,
            first_seq=self.log.first_seq, next_seq=self.log.next_seq,
            output_dropped=self.log.dropped)
