"""The remote SDK's one implementation (asyncio, httpx): a sandbox on a sandvm server.

``AsyncSandbox.create()`` asks the server (``$SANDVM_URL``, key ``$SANDVM_API_KEY``)
for a sandbox; ``commands.run`` streams the command's output back as it runs;
``files`` moves bytes in and out. Errors are the exceptions of ``sandvm.errors``,
rebuilt from the server's ``{"code", "message"}`` bodies; transport failures are
ServerUnreachable (cause chained).
"""

from __future__ import annotations

import asyncio
import base64
import json
import weakref
from typing import Any, Literal, overload
from urllib.parse import quote

import httpx

from sandvm import wire
from sandvm.client._files import AsyncFiles
from sandvm.client._http import (
    DEFAULT_URL,
    SandboxCalls,
    ServerApi,
    chunk_of,
    event_of,
    ndjson_lines,
    policy_body,
)
from sandvm.client._net import AsyncNetwork, AsyncPorts
from sandvm.core import parse_memory, signal_number
from sandvm.dto import CommandInfo, SandboxInfo, SnapshotInfo
from sandvm.egress_policy import NetworkPolicy
from sandvm.errors import (
    CommandExitError,
    CommandTimeout,
    InvalidSpec,
    SandboxStateError,
    ServerUnreachable,
    ServiceError,
    error_from_dict,
)
from sandvm.output import OutputBuffer
from sandvm.values import (
    DEFAULT_COMMAND_TIMEOUT,
    CommandResult,
    CommandStats,
    OutputCallback,
    RawOutputCallback,
)

CREATE_TIMEOUT = 180.0  # a cold boot under TCG takes seconds; a busy host more
MAX_LINE = 8 << 20  # one NDJSON event; the server sends far less

RECONNECTS = 5  # attempts to follow a background command's output again after a break
MAX_STDIN_CHUNK = 512 << 10  # bytes per stdin request (the server caps bodies at 1 MiB)

__all__ = ["DEFAULT_URL", "AsyncCommandHandle", "AsyncCommands", "AsyncFiles", "AsyncSandbox",
           "CommandInfo", "SandboxInfo"]


def _result(final: dict[str, Any], out: OutputBuffer, err: OutputBuffer, *,
            timeout: float | None, check: bool) -> CommandResult:
    """The CommandResult of an ``exit`` event; raises as the local API does."""
    code, sig = final.get("exit_code"), final.get("signal")
    dur = final.get("duration")
    if not isinstance(code, int) or not (sig is None or isinstance(sig, int)):
        raise ServiceError("the server sent a malformed exit event")
    result = CommandResult(
        exit_code=code, stdout_bytes=bytes(out.buf), stderr_bytes=bytes(err.buf),
        signal=sig, timed_out=bool(final.get("timed_out")),
        duration=float(dur) if isinstance(dur, (int, float)) else 0.0,
        output_truncated=out.truncated or err.truncated)
    if result.timed_out:
        raise CommandTimeout(f"command timed out after {timeout} s; its processes were"
                             " killed", result=result)
    if check and (code != 0 or sig is not None):
        raise CommandExitError(result)
    return result


class AsyncCommandHandle:
    """A background command on the server: ``wait`` for its result; signal it, feed
    its stdin, kill it. Its output is followed from the start (reconnecting after a
    broken connection) into ``stdout``/``stderr`` and the callbacks."""

    def __init__(self, sb: AsyncSandbox, info: CommandInfo, *, timeout: float | None,
                 check: bool, on_stdout: OutputCallback | None,
                 on_stderr: OutputCallback | None,
                 on_output: RawOutputCallback | None = None) -> None:
        self._sb = sb
        self.command_id = info.command_id
        self._pid = info.pid
        self._timeout = timeout
        self._check = check
        self._out = OutputBuffer(on_stdout, on_output, wire.CH_STDOUT)
        self._err = OutputBuffer(on_stderr, on_output, wire.CH_STDERR)
        self._next_seq = 0
        sb._handles.add(self)
        self._task = asyncio.get_running_loop().create_task(self._follow())
        # the outcome is read by wait(); never let asyncio report it as unretrieved
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

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

    def _path(self, suffix: str = "") -> str:
        return self._sb._path(f"/commands/{quote(self.command_id, safe='')}{suffix}")

    async def _follow(self) -> dict[str, Any]:
        breaks = 0
        while True:
            try:
                final = await self._read_from(self._next_seq)
            except ServerUnreachable:
                breaks += 1
                if breaks > RECONNECTS:
                    raise
                await asyncio.sleep(0.2 * 2 ** breaks)
                continue
            if final is not None:
                return final
            breaks += 1  # the stream ended early (e.g. the server stopping)
            if breaks > RECONNECTS:
                raise ServerUnreachable("the server kept ending the output stream of"
                                        f" command {self.command_id} before it ended")
            await asyncio.sleep(0.2 * 2 ** breaks)

    async def _read_from(self, offset: int) -> dict[str, Any] | None:
        read = None if self._timeout is None else self._timeout + 30.0
        async with self._sb._api.stream(
                "GET", self._path("/output"), params={"offset": offset},
                timeout=httpx.Timeout(60.0, connect=10.0, read=read)) as resp:
            try:
                async for line in ndjson_lines(resp):
                    event = event_of(line)
                    seq = event.get("seq")
                    if not isinstance(seq, int) or seq < self._next_seq:
                        raise ServiceError("the server sent an output event out of order")
                    if seq > self._next_seq:  # the server dropped output we had not read
                        self._out.truncated = True
                    self._next_seq = seq + 1
                    kind = event.get("type")
                    if kind == "stdout":
                        await self._out.feed(chunk_of(event))
                    elif kind == "stderr":
                        await self._err.feed(chunk_of(event))
                    elif kind == "error":
                        raise error_from_dict(event)
                    elif kind == "exit":
                        return event
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"the output stream of command {self.command_id}"
                                        f" broke: {exc}") from exc
        return None

    async def wait(self) -> CommandResult:
        """Wait for the command to end. Raises CommandExitError (if checking),
        CommandTimeout, SandboxStateError (the sandbox ended), ServerUnreachable."""
        try:
            final = await asyncio.shield(self._task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not self._task.cancelled() or (me is not None and me.cancelling()):
                raise
            raise SandboxStateError(f"the client of command {self.command_id} was closed:"
                                    " connect to the sandbox and the command again") from None
        return _result(final, self._out, self._err, timeout=self._timeout, check=self._check)

    async def abandon(self) -> None:
        """Stop following the command and kill it (SIGKILL through the server): ``wait``
        then raises SandboxStateError. For a holder letting go, as locally; a no-op once
        the command ended. Raises VmNotFound, SandboxStateError, ServerUnreachable."""
        self._task.cancel()
        await self.kill()

    async def send_signal(self, sig: int | str, *, grace: float | None = None) -> None:
        """Signal the command's process group; with ``grace``, SIGKILL everything after it."""
        body: dict[str, Any] = {"signal": signal_number(sig)}
        if grace is not None:
            body["grace"] = float(grace)
        await self._sb._api.call("POST", self._path("/signal"), json=body)

    async def kill(self) -> None:
        """SIGKILL every process of the command."""
        await self.send_signal("SIGKILL")

    async def send_stdin(self, data: bytes | str) -> None:
        """Write to the command's stdin (open unless ``stdin=`` was given at start).
        Raises SandboxStateError once it ended or its stdin was closed."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, max(len(raw), 1), MAX_STDIN_CHUNK):
            await self._sb._api.call(
                "POST", self._path("/stdin"), content=raw[i:i + MAX_STDIN_CHUNK],
                headers={"Content-Type": "application/octet-stream"})

    async def close_stdin(self) -> None:
        await self._sb._api.call("POST", self._path("/stdin/close"))

    async def info(self) -> CommandInfo:
        """The server's view of the command (state, exit)."""
        return CommandInfo.from_json(await self._sb._api.call("GET", self._path()))


def _command_body(cmd: str | list[str], *, env: dict[str, str] | None, cwd: str | None,
                  stdin: bytes | str | None, timeout: float | None,
                  user: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": cmd, "timeout": timeout}
    for name, value in (("env", env), ("cwd", cwd), ("user", user)):
        if value is not None:
            body[name] = value
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif isinstance(stdin, (bytes, bytearray, memoryview)):
        body["stdin_b64"] = base64.b64encode(bytes(stdin)).decode()
    elif stdin is not None:
        raise InvalidSpec("the remote stdin is bytes or str (sent whole)")
    return body


class AsyncCommands:
    """``sandbox.commands``: run commands in the remote sandbox."""

    def __init__(self, sb: AsyncSandbox) -> None:
        self._sb = sb

    @overload
    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
                  cwd: str | None = ..., stdin: bytes | str | None = ...,
                  timeout: float | None = ..., on_stdout: OutputCallback | None = ...,
                  on_stderr: OutputCallback | None = ..., background: Literal[False] = ...,
                  check: bool = ..., user: str | None = ...,
                  on_output: RawOutputCallback | None = ...) -> CommandResult: ...

    @overload
    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
                  cwd: str | None = ..., stdin: bytes | str | None = ...,
                  timeout: float | None = ..., on_stdout: OutputCallback | None = ...,
                  on_stderr: OutputCallback | None = ..., background: Literal[True],
                  check: bool = ..., user: str | None = ...,
                  on_output: RawOutputCallback | None = ...) -> AsyncCommandHandle: ...

    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                  cwd: str | None = None, stdin: bytes | str | None = None,
                  timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
                  on_stdout: OutputCallback | None = None,
                  on_stderr: OutputCallback | None = None,
                  background: bool = False, check: bool = True, user: str | None = None,
                  on_output: RawOutputCallback | None = None
                  ) -> CommandResult | AsyncCommandHandle:
        """Run ``cmd`` (a shell string, or an argv list) and return its result; its
        output reaches ``on_stdout``/``on_stderr`` while it runs.

        Allowed while the sandbox runs. ``timeout`` kills the command's processes
        (None: no limit). ``stdin`` is sent whole. With ``background=True`` returns
        a handle at once (its ``command_id`` reattaches: ``connect``); its stdin
        stays open unless ``stdin`` was given. Raises CommandExitError on a
        non-zero exit unless ``check=False``, CommandTimeout, CommandNotFound,
        SandboxStateError (killed, ended), VmNotFound, ServerUnreachable.
        ``on_output`` takes the raw output instead (see ``start``).
        """
        return await self._run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                               on_stdout=on_stdout, on_stderr=on_stderr,
                               background=background, check=check, user=user,
                               on_output=on_output)

    async def start(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                    cwd: str | None = None, stdin: bytes | str | None = None,
                    timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
                    on_stdout: OutputCallback | None = None,
                    on_stderr: OutputCallback | None = None,
                    check: bool = True, user: str | None = None,
                    on_output: RawOutputCallback | None = None) -> AsyncCommandHandle:
        """Start ``cmd`` on the server and return its handle: ``run`` with
        ``background=True``, typed. Its stdin stays open for ``send_stdin`` unless
        ``stdin`` is given. ``on_output(channel, data)`` receives the output as raw
        bytes (channel 1 stdout, 2 stderr) instead of the handle keeping it (then
        ``on_stdout``/``on_stderr`` may not be given). Raises InvalidSpec,
        CommandNotFound, QuotaExceeded, SandboxStateError, VmNotFound."""
        handle = await self._run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                                 on_stdout=on_stdout, on_stderr=on_stderr, background=True,
                                 check=check, user=user, on_output=on_output)
        assert isinstance(handle, AsyncCommandHandle)
        return handle

    async def _run(self, cmd: str | list[str], *, env: dict[str, str] | None,
                   cwd: str | None, stdin: bytes | str | None, timeout: float | None,
                   on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                   background: bool, check: bool, user: str | None,
                   on_output: RawOutputCallback | None = None
                   ) -> CommandResult | AsyncCommandHandle:
        """The one implementation behind AsyncCommands.run and Commands.run."""
        sb = self._sb
        sb._check_open()
        if on_output is not None and (on_stdout is not None or on_stderr is not None):
            raise InvalidSpec("on_output takes the raw output: give it or on_stdout/"
                              "on_stderr, not both")
        body = _command_body(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, user=user)
        if background:
            info = CommandInfo.from_json(await sb._api.call(
                "POST", sb._path("/commands/start"), json=body))
            return AsyncCommandHandle(sb, info, timeout=timeout, check=check,
                                      on_stdout=on_stdout, on_stderr=on_stderr,
                                      on_output=on_output)
        out = OutputBuffer(on_stdout, on_output, wire.CH_STDOUT)
        err = OutputBuffer(on_stderr, on_output, wire.CH_STDERR)
        final: dict[str, Any] | None = None
        read = None if timeout is None else timeout + 30.0
        async with sb._api.stream("POST", sb._path("/commands"), json=body,
                                  timeout=httpx.Timeout(60.0, connect=10.0, read=read)) as resp:
            try:
                async for line in ndjson_lines(resp):
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise ServiceError("the server sent a line that is not JSON") from None
                    kind = event.get("type") if isinstance(event, dict) else None
                    if final is not None:
                        continue  # the stream's end follows: read it, so that the
                        # connection goes back to the pool (not closed for the next one)
                    if kind == "stdout":
                        await out.feed(chunk_of(event))
                    elif kind == "stderr":
                        await err.feed(chunk_of(event))
                    elif kind == "error":
                        raise error_from_dict(event)
                    elif kind == "exit":
                        final = event
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"the connection to {sb._api.url} broke while the"
                                        f" command ran: {exc}") from exc
        if final is None:
            raise ServerUnreachable("the server ended the output stream before the command"
                                    " ended")
        return _result(final, out, err, timeout=timeout, check=check)

    async def connect(self, command_id: str, *, timeout: float | None = None,
                      on_stdout: OutputCallback | None = None,
                      on_stderr: OutputCallback | None = None,
                      check: bool = True) -> AsyncCommandHandle:
        """A handle on the background command ``command_id`` (started by any client of
        this tenant), its output followed from the first byte the server kept.
        ``timeout`` only bounds how long a silent output stream is waited for. Raises
        ServiceError (no such command), VmNotFound, SandboxStateError."""
        sb = self._sb
        sb._check_open()
        if not isinstance(command_id, str) or not 0 < len(command_id) <= 63:
            raise InvalidSpec("command_id must be a command id (cmd-...)")
        info = CommandInfo.from_json(await sb._api.call(
            "GET", sb._path(f"/commands/{quote(command_id, safe='')}")))
        return AsyncCommandHandle(sb, info, timeout=timeout, check=check,
                                  on_stdout=on_stdout, on_stderr=on_stderr)

    async def stats(self, pid: int) -> CommandStats:
        """CPU time, memory and process count of the running command ``pid`` (a handle's
        ``pid``), as locally. Raises InvalidSpec, SandboxStateError, VmNotFound."""
        sb = self._sb
        sb._check_open()
        if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= 1 << 22:
            raise InvalidSpec(f"pid must be a process id in 1..{1 << 22}, got {pid!r}")
        d = await sb._api.call("GET", sb._path("/stats"), params={"pid": pid})
        try:
            assert isinstance(d, dict)
            return CommandStats(running=bool(d["running"]), cpu_usec=int(d["cpu_usec"]),
                                memory_bytes=int(d["memory_bytes"]),
                                processes=int(d["processes"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise ServiceError("the server sent malformed command stats") from None

    async def list(self) -> list[CommandInfo]:
        """The sandbox's background commands the server keeps (running, and the latest
        that ended), oldest first."""
        sb = self._sb
        sb._check_open()
        res = await sb._api.call("GET", sb._path("/commands"))
        items = res.get("commands") if isinstance(res, dict) else None
        if not isinstance(items, list):
            raise ServiceError("the server sent a malformed command list")
        return [CommandInfo.from_json(i) for i in items]


class AsyncSandbox:
    """A sandbox on a sandvm server. Use ``await AsyncSandbox.create(...)`` or
    ``await AsyncSandbox.connect(sandbox_id)``."""

    def __init__(self, *, api: ServerApi, info: SandboxInfo) -> None:
        self._api = api
        self.sandbox_id = info.sandbox_id
        self._last_info = info
        calls = SandboxCalls(api, self.sandbox_id, self._check_open)
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(calls)
        self.ports = AsyncPorts(calls)  # guest ports exposed on the server's host
        self.network = AsyncNetwork(calls)  # egress policy and events
        self._killed = False
        self._handles: weakref.WeakSet[AsyncCommandHandle] = weakref.WeakSet()

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{quote(self.sandbox_id, safe='')}{suffix}"

    def _check_open(self) -> None:
        if self._killed:
            raise SandboxStateError(f"sandbox {self.sandbox_id} has been killed")

    @classmethod
    async def create(cls, *, image: str | None = None, memory_mib: int | str = 256,
                     vcpus: int = 1, timeout: float | None = None,
                     network: NetworkPolicy | None = None, api_key: str | None = None,
                     url: str | None = None,
                     transport: httpx.AsyncBaseTransport | None = None) -> AsyncSandbox:
        """A new sandbox on the server (``url``, default ``$SANDVM_URL``) for the tenant
        of ``api_key`` (default ``$SANDVM_API_KEY``), alive ``timeout`` seconds (None:
        the server's default; ``set_timeout`` changes it). ``network``: egress by
        ``allow``/``ports``/``allow_http``/``max_bytes`` (other fields are the
        server operator's). Raises Unauthenticated, QuotaExceeded, InvalidSpec,
        UnknownImage, VmBootError, ServerUnreachable."""
        body: dict[str, Any] = {"memory_mib": parse_memory(memory_mib), "vcpus": vcpus}
        if image is not None:
            body["image"] = image
        return await cls._new(body, timeout=timeout, network=network,
                              api=ServerApi(api_key=api_key, url=url, transport=transport))

    @classmethod
    async def _new(cls, body: dict[str, Any], *, timeout: float | None,
                   network: NetworkPolicy | None, api: ServerApi) -> AsyncSandbox:
        """POST /v1/sandboxes with ``body`` (plus timeout and network)."""
        if timeout is not None:
            body["timeout"] = timeout
        try:
            if network is not None:
                body["network"] = policy_body(network)
            info = SandboxInfo.from_json(await api.call(
                "POST", "/v1/sandboxes", json=body,
                timeout=httpx.Timeout(60.0, connect=10.0, read=CREATE_TIMEOUT)))
        except BaseException:
            await api.aclose()
            raise
        return cls(api=api, info=info)

    @classmethod
    async def from_snapshot(cls, snapshot: str, *, timeout: float | None = None,
                            network: NetworkPolicy | None = None, api_key: str | None = None,
                            url: str | None = None,
                            transport: httpx.AsyncBaseTransport | None = None
                            ) -> AsyncSandbox:
        """A new sandbox restored from the tenant's snapshot named ``snapshot`` (files
        and processes as they were). Raises SnapshotNotFound, QuotaExceeded,
        VmBootError, Unauthenticated, ServerUnreachable."""
        if not isinstance(snapshot, str):
            raise InvalidSpec("snapshot must be the name of a snapshot on the server")
        return await cls._new({"snapshot": snapshot}, timeout=timeout, network=network,
                              api=ServerApi(api_key=api_key, url=url, transport=transport))

    async def snapshot(self, name: str | None = None, *, stop: bool = False
                       ) -> SnapshotInfo:
        """Save this sandbox on the server as the tenant's snapshot ``name`` (default:
        a new id); returns its SnapshotInfo. The sandbox goes on running, or with
        ``stop=True`` is killed once saved. Raises SnapshotAlreadyExists,
        QuotaExceeded, SandboxStateError."""
        self._check_open()
        body = {} if name is None else {"name": name}
        snap = SnapshotInfo.from_json(await self._api.call(
            "POST", self._path("/snapshots"), json=body,
            timeout=httpx.Timeout(60.0, connect=10.0, read=CREATE_TIMEOUT)))
        if stop:
            await self.kill()
        return snap

    async def pause(self, *, to_disk: bool = False) -> SnapshotInfo | None:
        """Freeze the sandbox's vCPUs on the server (its memory stays allocated, its
        timeout runs on) until ``resume``; or with ``to_disk`` save it as the tenant's
        snapshot ``paused-<id>`` and kill it: ``resume_from`` brings it back (with a
        new id). Commands wait while it is paused. Raises SandboxStateError,
        SnapshotAlreadyExists, QuotaExceeded."""
        self._check_open()
        if to_disk:
            return await self.snapshot(f"paused-{self.sandbox_id}", stop=True)
        await self._api.call("POST", self._path("/pause"))
        return None

    @classmethod
    async def resume_from(cls, paused: SnapshotInfo | str, *, timeout: float | None = None,
                          api_key: str | None = None, url: str | None = None,
                          transport: httpx.AsyncBaseTransport | None = None
                          ) -> AsyncSandbox:
        """Bring back a sandbox paused to disk (the SnapshotInfo ``pause(to_disk=True)``
        returned, or its name); its snapshot is removed. Raises like ``from_snapshot``."""
        name = paused if isinstance(paused, str) else paused.name
        sb = await cls.from_snapshot(name, timeout=timeout, api_key=api_key, url=url,
                                     transport=transport)
        await sb._api.call("DELETE", f"/v1/snapshots/{quote(name, safe='')}")
        return sb

    async def resume(self) -> None:
        """Let a paused sandbox run again, its clock stepped to the host's. Raises
        SandboxStateError."""
        self._check_open()
        await self._api.call("POST", self._path("/resume"))

    async def ping(self) -> float:
        """The guest agent's round trip in seconds, measured on the server."""
        self._check_open()
        res = await self._api.call("GET", self._path("/ping"))
        if not isinstance(res, dict) or not isinstance(res.get("seconds"), (int, float)):
            raise ServiceError("the server sent a malformed ping answer")
        return float(res["seconds"])

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the VM, with the local ``info``'s keys: accelerator, boot time,
        guest kernel, agent version (as the server last reported them; None where it
        did not know), image, memory, vCPUs. ``qemu_pid`` is None and ``volumes``
        empty: the VM is the server's. ``get_info()`` asks the server again."""
        i = self._last_info
        return {"sandbox_id": self.sandbox_id, "accelerator": i.accelerator,
                "image": i.image, "boot_seconds": i.boot_seconds, "qemu_pid": None,
                "memory_mib": i.memory_mib, "vcpus": i.vcpus,
                "guest_kernel": i.guest_kernel, "agent_version": i.agent_version,
                "volumes": {}}

    async def fork(self, n: int, *, timeout: float | None = None) -> list[AsyncSandbox]:
        """``n`` new running copies of this sandbox on the server (each counted in the
        tenant's quota; ``timeout``: their lifetime). Raises QuotaExceeded, InvalidSpec,
        SandboxStateError."""
        self._check_open()
        body: dict[str, Any] = {"n": n}
        if timeout is not None:
            body["timeout"] = timeout
        res = await self._api.call("POST", self._path("/fork"), json=body,
                                   timeout=httpx.Timeout(60.0, connect=10.0,
                                                         read=CREATE_TIMEOUT))
        items = res.get("sandboxes") if isinstance(res, dict) else None
        if not isinstance(items, list):
            raise ServiceError("the server sent a malformed sandbox list")
        return [AsyncSandbox(api=self._api.sibling(), info=SandboxInfo.from_json(i))
                for i in items]

    @classmethod
    async def connect(cls, sandbox_id: str, *, api_key: str | None = None,
                      url: str | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> AsyncSandbox:
        """The running sandbox ``sandbox_id`` of this key's tenant (e.g. made by another
        process). Raises VmNotFound (unknown, or another tenant's), SandboxStateError
        (ended), Unauthenticated, ServerUnreachable."""
        api = ServerApi(api_key=api_key, url=url, transport=transport)
        try:
            info = SandboxInfo.from_json(await api.call(
                "GET", f"/v1/sandboxes/{quote(sandbox_id, safe='')}"))
        except BaseException:
            await api.aclose()
            raise
        return cls(api=api, info=info)

    @classmethod
    async def list(cls, *, api_key: str | None = None, url: str | None = None,
                   transport: httpx.AsyncBaseTransport | None = None) -> list[SandboxInfo]:
        """The running sandboxes of this key's tenant."""
        api = ServerApi(api_key=api_key, url=url, transport=transport)
        try:
            res = await api.call("GET", "/v1/sandboxes")
        finally:
            await api.aclose()
        items = res.get("sandboxes") if isinstance(res, dict) else None
        if not isinstance(items, list):
            raise ServiceError("the server sent a malformed sandbox list")
        return [SandboxInfo.from_json(i) for i in items]

    async def get_info(self) -> SandboxInfo:
        """The server's view of this sandbox (state, timeout; ``info``'s facts, which
        this refreshes). Raises SandboxStateError once it ended."""
        self._check_open()
        self._last_info = SandboxInfo.from_json(await self._api.call("GET", self._path()))
        return self._last_info

    async def set_timeout(self, timeout: float) -> None:
        """Let the sandbox live ``timeout`` more seconds from now (not longer than the
        server's max TTL). Raises InvalidSpec, SandboxStateError."""
        self._check_open()
        await self._api.call("POST", self._path("/timeout"), json={"timeout": timeout})

    async def is_running(self) -> bool:
        if self._killed:
            return False
        try:
            return (await self.get_info()).state == "running"
        except SandboxStateError:
            return False

    async def kill(self) -> None:
        """Destroy the sandbox (idempotent) and close the connection to the server."""
        if self._killed:
            return
        self._killed = True
        self._stop_following()
        try:
            await self._api.call("DELETE", self._path())
        except SandboxStateError:
            pass  # it had ended already
        finally:
            await self._api.aclose()

    def _stop_following(self) -> None:
        for h in list(self._handles):
            h._task.cancel()

    async def close(self) -> None:
        """Close the connection to the server; the sandbox and its background commands
        keep running (until its timeout): ``connect`` to it again by id."""
        self._stop_following()
        await self._api.aclose()

    async def aclose(self) -> None:
        await self.kill()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
