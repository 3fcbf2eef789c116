"""Commands in a sandbox: run to completion, or start and hold a handle.

``AsyncCommands``/``AsyncCommandHandle`` are the implementation; ``Commands`` and
``CommandHandle`` their sync twins (via the blocking portal).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signal_mod
import time
from collections.abc import (
    AsyncIterable,
    Iterable,
)
from typing import TYPE_CHECKING, Any, Literal, overload

from sandvm import _portal, wire
from sandvm.agent_client import (
    HostStream,
    guest_bool,
    guest_float,
    guest_int,
    guest_opt_int,
)
from sandvm.core import (
    check_guest_path,
    signal_number,
)
from sandvm.errors import (
    AgentTimeout,
    CommandExitError,
    CommandTimeout,
    InvalidSpec,
    SandboxStateError,
    SandvmError,
)
from sandvm.guestops import GuestOps
from sandvm.output import OutputBuffer
from sandvm.values import (
    DEFAULT_COMMAND_TIMEOUT,
    MAX_COMMAND_TIMEOUT,
    MAX_DURATION,
    PID_MAX,
    CommandResult,
    CommandStats,
    OutputCallback,
    RawOutputCallback,
    StdinSource,
)

if TYPE_CHECKING:
    from sandvm.link import SandboxLink

_HOST_GRACE = 10.0  # the host waits this long past a command's timeout for the guest

class AsyncCommandHandle:
    """A running command. ``wait`` for its result; signal it, feed its stdin, kill it."""

    def __init__(self, stream: HostStream, *, timeout: float | None, check: bool,
                 on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                 stdin: StdinSource, stdin_open: bool,
                 raw_output: RawOutputCallback | None = None) -> None:
        self._stream = stream
        self._timeout = timeout
        self._check = check
        self._out = OutputBuffer(on_stdout, raw_output, wire.CH_STDOUT)
        self._err = OutputBuffer(on_stderr, raw_output, wire.CH_STDERR)
        self._stdin_open = stdin_open
        self._pid: int | None = None
        self._started = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._collect())
        # the outcome is read by wait(); never let asyncio report it as unretrieved
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._stdin_task: asyncio.Task[None] | None = None
        if stdin is not None:
            self._stdin_task = asyncio.get_running_loop().create_task(self._feed(stdin))

    @property
    def pid(self) -> int | None:
        """The command's process id in the guest (its process group id too)."""
        return self._pid

    @property
    def stdout(self) -> str:
        """Output so far."""
        return self._out.text()

    @property
    def stderr(self) -> str:
        return self._err.text()

    async def _feed(self, stdin: StdinSource) -> None:
        with contextlib.suppress(SandvmError):
            if isinstance(stdin, str):
                stdin = stdin.encode()
            if isinstance(stdin, (bytes, bytearray, memoryview)):
                await self._stream.send_data(bytes(stdin))
            elif isinstance(stdin, AsyncIterable):
                async for chunk in stdin:
                    await self._stream.send_data(chunk)
            elif stdin is not None:
                for chunk in stdin:
                    await self._stream.send_data(chunk)
            await self._stream.send_eof()

    async def _collect(self) -> dict[str, Any]:
        limit = None if self._timeout is None else self._timeout + _HOST_GRACE
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = await self._stream.next(remaining)
            except SandvmError as exc:
                await self._stream.reset()
                if not self._started.done():
                    self._started.set_exception(exc)
                if deadline is not None and time.monotonic() >= deadline:
                    raise CommandTimeout(
                        f"command did not finish within {self._timeout} s and the guest did"
                        " not report it") from exc
                raise
            if item.kind == "data":
                out = self._out if item.channel == wire.CH_STDOUT else self._err
                try:
                    await out.feed(item.data)
                except BaseException:
                    # a failing output callback abandons the command: kill it in the guest
                    await self._stream.reset()
                    raise
            elif item.kind == "event":
                msg = item.message or {}
                if msg.get("event") == "started":
                    self._pid = guest_int(msg, "pid", lo=1, hi=PID_MAX, what="start event")
                    if not self._started.done():
                        self._started.set_result(None)
            elif item.kind == "reply":
                if not self._started.done():
                    self._started.set_result(None)
                return item.message or {}
            elif item.kind == "error":
                assert item.error is not None
                if not self._started.done():
                    self._started.set_exception(item.error)
                    self._started.exception()
                raise item.error

    async def wait(self) -> CommandResult:
        """Wait for the command to end. Raises CommandExitError (if checking), CommandTimeout."""
        msg = await asyncio.shield(self._task)
        w = "exit report"
        code = guest_int(msg, "exit_code", hi=255, what=w)
        sig = guest_opt_int(msg, "signal", lo=1, hi=255, what=w)
        result = CommandResult(
            exit_code=code, stdout_bytes=bytes(self._out.buf), stderr_bytes=bytes(self._err.buf),
            signal=sig, timed_out=guest_bool(msg, "timed_out", what=w),
            duration=guest_float(msg, "duration", hi=MAX_DURATION, default=0.0, what=w),
            output_truncated=self._out.truncated or self._err.truncated)
        if result.timed_out:
            raise CommandTimeout(
                f"command timed out after {self._timeout} s; its processes were killed",
                result=result)
        if self._check and (code != 0 or sig is not None):
            raise CommandExitError(result)
        return result

    async def send_signal(self, sig: int | str, *, grace: float | None = None) -> None:
        """Signal the command's process group; with ``grace``, SIGKILL everything after it."""
        msg: dict[str, Any] = {"signal": signal_number(sig)}
        if grace is not None:
            msg["grace"] = float(grace)
        await self._stream.send_ctrl(msg)

    async def kill(self) -> None:
        """SIGKILL every process of the command."""
        await self.send_signal(signal_mod.SIGKILL)

    async def send_stdin(self, data: bytes | str) -> None:
        """Write to the command's stdin (needs ``stdin=`` or ``background=True`` at start)."""
        if not self._stdin_open:
            raise SandboxStateError("this command was started without stdin")
        await self._stream.send_data(data.encode() if isinstance(data, str) else data)

    async def close_stdin(self) -> None:
        await self._stream.send_eof()

    async def abandon(self) -> None:
        """Stop following the command: its stream is reset, so the guest kills it and
        ``wait`` ends with an error. For a holder letting go of the sandbox; a no-op
        once the command ended. Raises AgentError if the channel is gone."""
        await self._stream.reset()


class AsyncCommands:
    """``sandbox.commands``: run commands in the guest."""

    def __init__(self, sb: SandboxLink) -> None:
        self._sb = sb

    @overload
    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
                  cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
                  on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
                  background: Literal[False] = ..., check: bool = ...,
                  user: str | None = ..., on_output: RawOutputCallback | None = ...
                  ) -> CommandResult: ...

    @overload
    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
                  cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
                  on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
                  background: Literal[True], check: bool = ...,
                  user: str | None = ..., on_output: RawOutputCallback | None = ...
                  ) -> AsyncCommandHandle: ...

    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                  cwd: str | None = None, stdin: StdinSource = None,
                  timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
                  on_stdout: OutputCallback | None = None,
                  on_stderr: OutputCallback | None = None,
                  background: bool = False, check: bool = True, user: str | None = None,
                  on_output: RawOutputCallback | None = None
                  ) -> CommandResult | AsyncCommandHandle:
        """Run ``cmd`` (a shell string, or an argv list) and return its result.

        Allowed while the sandbox is running. ``timeout`` kills the command's
        whole process group (None: no limit). With ``background=True`` returns a
        handle at once (as ``start``). In an image, the image's Env, WorkingDir and
        User are the defaults; ``user`` is a name or ``uid[:gid]`` from the image's
        /etc/passwd. ``on_output`` takes the raw output instead (see ``start``).
        Raises CommandExitError on a non-zero exit unless ``check=False``,
        CommandTimeout, CommandNotFound, SandboxStateError, InvalidSpec.
        """
        return await self._run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                               on_stdout=on_stdout, on_stderr=on_stderr,
                               background=background, check=check, user=user,
                               raw_output=on_output)

    async def start(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                    cwd: str | None = None, stdin: StdinSource = None,
                    timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
                    on_stdout: OutputCallback | None = None,
                    on_stderr: OutputCallback | None = None,
                    check: bool = True, user: str | None = None,
                    on_output: RawOutputCallback | None = None) -> AsyncCommandHandle:
        """Start ``cmd`` and return its handle once the guest has started it: ``run``
        with ``background=True``, the same options, typed.

        Its stdin stays open for ``send_stdin`` unless ``stdin`` is given (then that is
        its whole input). ``on_output(channel, data)`` receives the output as raw bytes
        as it arrives (channel ``wire.CH_STDOUT`` = 1 or ``wire.CH_STDERR`` = 2) instead
        of the handle keeping it: the handle's ``stdout``/``stderr`` then stay empty,
        and ``on_stdout``/``on_stderr`` may not be given with it. It may be a coroutine
        function: while it awaits, no more output is read from the guest
        (backpressure). If it raises, the command is killed and ``wait`` raises that.
        Allowed while the sandbox is running. Raises InvalidSpec, CommandNotFound,
        AgentTimeout (the guest did not start it within the sandbox's ``op_timeout``),
        SandboxStateError, VmCrashed.
        """
        handle = await self._run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                                 on_stdout=on_stdout, on_stderr=on_stderr, background=True,
                                 check=check, user=user, raw_output=on_output)
        assert isinstance(handle, AsyncCommandHandle)
        return handle

    async def _run(self, cmd: str | list[str], *, env: dict[str, str] | None,
                   cwd: str | None, stdin: StdinSource, timeout: float | None,
                   on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                   background: bool, check: bool, user: str | None = None,
                   raw_output: RawOutputCallback | None = None
                   ) -> CommandResult | AsyncCommandHandle:
        """The one implementation behind AsyncCommands.run and Commands.run.

        ``raw_output`` (``on_output`` of run/start) receives the output as bytes
        instead of the handle keeping it (then ``stdout``/``stderr`` stay empty)."""
        if raw_output is not None and (on_stdout is not None or on_stderr is not None):
            raise InvalidSpec("on_output takes the raw output: give it or on_stdout/"
                              "on_stderr, not both")
        req: dict[str, Any] = {}  # GuestOps.exec's arguments
        proxy = self._sb.network.env()
        if proxy:  # the workload's HTTP(S) goes through the host's egress proxy
            env = {**proxy, **(env or {})}
        image = self._sb.image_record
        if image is not None:
            env = {**image_env(image.env), **(env or {})}
            if cwd is None:
                cwd = image.working_dir or "/"
            if user is None and image.user:
                user = image.user
        if user is not None:
            if not isinstance(user, str) or not user or len(user) > 256:
                raise InvalidSpec("user must be a name or 'uid[:gid]'")
            req["user"] = user
        if isinstance(cmd, str):
            req["shell"] = cmd
        elif isinstance(cmd, (list, tuple)) and cmd and all(isinstance(a, str) for a in cmd):
            req["argv"] = list(cmd)
        else:
            raise InvalidSpec("cmd must be a shell string or a non-empty list of strings")
        if env:
            if not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                       for k, v in env.items()):
                raise InvalidSpec("env must map variable names (no '=') to strings")
            req["env"] = dict(env)
        if cwd is not None:
            req["cwd"] = check_guest_path(cwd)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                    not 0 < timeout <= MAX_COMMAND_TIMEOUT:
                raise InvalidSpec(f"timeout must be seconds in (0, {MAX_COMMAND_TIMEOUT:.0f}]"
                                  f" or None, got {timeout!r}")
            req["timeout"] = float(timeout)
        stdin_open = stdin is not None or background
        req["stdin"] = stdin_open
        stream = await GuestOps(self._sb.connection()).exec(**req)
        handle = AsyncCommandHandle(stream, timeout=timeout, check=check, on_stdout=on_stdout,
                                    on_stderr=on_stderr, stdin=stdin, stdin_open=stdin_open,
                                    raw_output=raw_output)
        if background:
            try:
                await asyncio.wait_for(asyncio.shield(handle._started), self._sb.op_timeout)
            except TimeoutError:
                await stream.reset()
                raise AgentTimeout(
                    f"the guest did not start the command within {self._sb.op_timeout} s"
                ) from None
            return handle
        try:
            return await handle.wait()
        except asyncio.CancelledError:
            await stream.reset()
            raise

    async def stats(self, pid: int) -> CommandStats:
        """CPU time, memory and process count of the running command ``pid`` (a handle's
        ``pid``): its cgroup in the guest, else its leader alone. ``running`` is False
        (and the figures 0) once it has ended. Allowed while the sandbox runs. Raises
        InvalidSpec, SandboxStateError, AgentProtocolError (figures the guest garbled)."""
        if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= PID_MAX:
            raise InvalidSpec(f"pid must be a process id in 1..{PID_MAX}, got {pid!r}")
        return await GuestOps(self._sb.connection()).stats(pid=pid,
                                                           timeout=self._sb.op_timeout)



class CommandHandle:
    """Sync twin of AsyncCommandHandle."""

    def __init__(self, inner: AsyncCommandHandle) -> None:
        self._a = inner

    @property
    def pid(self) -> int | None:
        return self._a.pid

    @property
    def stdout(self) -> str:
        return self._a.stdout

    @property
    def stderr(self) -> str:
        return self._a.stderr

    def wait(self) -> CommandResult:
        return _portal.call(self._a.wait())

    def send_signal(self, sig: int | str, *, grace: float | None = None) -> None:
        _portal.call(self._a.send_signal(sig, grace=grace))

    def kill(self) -> None:
        _portal.call(self._a.kill())

    def send_stdin(self, data: bytes | str) -> None:
        _portal.call(self._a.send_stdin(data))

    def close_stdin(self) -> None:
        _portal.call(self._a.close_stdin())

    def abandon(self) -> None:
        """See AsyncCommandHandle.abandon."""
        _portal.call(self._a.abandon())


class Commands:
    """Sync twin of AsyncCommands."""

    def __init__(self, inner: AsyncCommands) -> None:
        self._a = inner

    def stats(self, pid: int) -> CommandStats:
        """See AsyncCommands.stats."""
        return _portal.call(self._a.stats(pid))

    @overload
    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
            cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
            on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
            background: Literal[False] = ..., check: bool = ...,
            user: str | None = ..., on_output: RawOutputCallback | None = ...
            ) -> CommandResult: ...

    @overload
    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
            cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
            on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
            background: Literal[True], check: bool = ...,
            user: str | None = ..., on_output: RawOutputCallback | None = ...
            ) -> CommandHandle: ...

    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: StdinSource = None,
            timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
            on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None,
            background: bool = False, check: bool = True,
            user: str | None = None, on_output: RawOutputCallback | None = None
            ) -> CommandResult | CommandHandle:
        """See AsyncCommands.run."""
        res = _portal.call(self._a._run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                                        on_stdout=on_stdout, on_stderr=on_stderr,
                                        background=background, check=check, user=user,
                                        raw_output=on_output))
        return CommandHandle(res) if isinstance(res, AsyncCommandHandle) else res

    def start(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
              cwd: str | None = None, stdin: StdinSource = None,
              timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
              on_stdout: OutputCallback | None = None,
              on_stderr: OutputCallback | None = None,
              check: bool = True, user: str | None = None,
              on_output: RawOutputCallback | None = None) -> CommandHandle:
        """See AsyncCommands.start (the callbacks run on sandvm's portal thread)."""
        return CommandHandle(_portal.call(self._a.start(
            cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, on_stdout=on_stdout,
            on_stderr=on_stderr, check=check, user=user, on_output=on_output)))



def image_env(pairs: Iterable[str]) -> dict[str, str]:
    """An image config's ``Env`` (``NAME=value`` strings) as a dict; bad items skipped."""
    out = {}
    for item in pairs:
        name, eq, value = str(item).partition("=")
        if eq and name:
            out[name] = value
    return out


