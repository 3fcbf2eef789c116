"""A small asyncio QMP client (QEMU Machine Protocol over a unix socket).

Replies are matched to calls by id through a table of pending calls; when the
connection drops, every pending call fails with QmpError. Events are kept in a
bounded queue for whoever wants them. File descriptors can be passed with a
command (SCM_RIGHTS), as ``getfd`` needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections import deque
from typing import Any

from sandvm.errors import QmpError

MAX_LINE = 1 << 20


class QmpClient:
    """One QMP connection. ``connect`` negotiates capabilities; ``execute`` runs a command."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=256)
        self.greeting: dict[str, Any] = {}
        self._closed_reason: str | None = None

    async def connect(self, path: str, *, timeout: float = 10.0) -> None:
        """Connect to ``path`` and leave capabilities negotiation. Raises QmpError."""
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=MAX_LINE), timeout)
            self._reader = reader
            line = await asyncio.wait_for(reader.readline(), timeout)
            self.greeting = json.loads(line)
        except (OSError, TimeoutError, ValueError) as exc:
            raise QmpError(f"cannot connect to QMP at {path}: {exc!r}") from exc
        if "QMP" not in self.greeting:
            raise QmpError(f"unexpected QMP greeting: {self.greeting!r}")
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        await self.execute("qmp_capabilities", timeout=timeout)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "QMP connection closed"
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "event" in msg:
                    self.events.append(msg)
                    continue
                fut = self._pending.pop(str(msg.get("id")), None)
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    err = msg["error"] if isinstance(msg["error"], dict) else {}
                    fut.set_exception(QmpError(f"{err.get('class')}: {err.get('desc')}"))
                else:
                    fut.set_result(msg.get("return"))
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            reason = f"QMP connection failed: {exc!r}"
        finally:
            self._closed_reason = reason
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(QmpError(reason))
            self._pending.clear()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      fds: list[int] | None = None, timeout: float = 30.0) -> Any:
        """Run one QMP command and return its ``return`` value. Raises QmpError."""
        if self._writer is None or self._closed_reason is not None:
            raise QmpError(self._closed_reason or "QMP is not connected")
        cid = str(next(self._ids))
        msg: dict[str, Any] = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            if fds:
                sock = self._writer.get_extra_info("socket")
                await self._writer.drain()
                raw = socket.socket(fileno=sock.fileno())
                try:
                    socket.send_fds(raw, [data], fds)
                finally:
                    raw.detach()
            else:
                self._writer.write(data)
                await self._writer.drain()
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise QmpError(f"QMP command {command} timed out after {timeout} s") from None
        except OSError as exc:
            raise QmpError(f"QMP command {command} failed: {exc!r}") from exc
        finally:
            self._pending.pop(cid, None)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._writer = None
