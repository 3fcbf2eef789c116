"""The service behind the HTTP handlers: tenants' sandboxes, held through the manager.

Every sandbox the server makes is a managed one (``SandboxManager``): it runs under
its keeper, so it outlives the server. The server records its owner (a tenant) in
its own database, holds the sandboxes it uses (one holder at a time, as the manager
wants), and detaches them all when it stops; after a restart it runs the manager's
``recover`` and attaches to a sandbox again the first time a request names it.

Tenancy: every call names the tenant its API key belongs to. A sandbox that does not
exist and one that belongs to another tenant are the same to the caller: VmNotFound.

States of an owned sandbox, as the caller sees them: running (usable), or ended
(killed, TTL over, keeper gone: SandboxStateError). A sandbox being created is not
listed until it runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sandvm import wire
from sandvm.agent_client import guest_int
from sandvm.core import check_guest_path, new_id, validate_vm_id
from sandvm.egress import NetworkPolicy
from sandvm.errors import (
    AgentError,
    AgentProtocolError,
    CommandTimeout,
    GuestError,
    InvalidSpec,
    QuotaExceeded,
    RequestTooLarge,
    SandboxStateError,
    SandvmError,
    Unauthenticated,
    VmError,
    VmNotFound,
)
from sandvm.guestops import GuestOps
from sandvm.runtime.journal import SandboxRecord
from sandvm.runtime.manager import Recovery, SandboxManager, keeper_alive
from sandvm.sandbox import AsyncCommandHandle, AsyncSandbox, CommandResult
from sandvm.server.commands import BackgroundCommand, unknown_command
from sandvm.server.config import ServerConfig
from sandvm.server.library import Library
from sandvm.server.metrics import Metrics
from sandvm.server.models import CommandInfo, SandboxInfo, WriteResult
from sandvm.server.networking import Networking
from sandvm.server.redact import Redactor, status_for
from sandvm.server.store import ServerStore

log = logging.getLogger("sandvm.server")

REAP_INTERVAL = 2.0  # seconds between looks for sandboxes that ended on their own
_OUTPUT_QUEUE = 16  # output chunks between the guest and a slow HTTP client


def _not_found(sandbox_id: str) -> VmNotFound:
    exc = VmNotFound(sandbox_id)
    exc.message = f"no sandbox {sandbox_id!r}"
    exc.args = (exc.message,)
    return exc


def output_event(channel: int, data: bytes) -> dict[str, Any]:
    """One ``stdout``/``stderr`` line of a command's stream: text if the chunk is
    valid UTF-8, else base64 (a chunk can end inside a character)."""
    kind = "stdout" if channel == wire.CH_STDOUT else "stderr"
    try:
        return {"type": kind, "text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"type": kind, "b64": base64.b64encode(data).decode()}


class SandboxService:
    """Tenants' sandboxes. ``start`` before use, ``stop`` at the end (detaches all)."""

    def __init__(self, config: ServerConfig, *, store: ServerStore | None = None,
                 manager: SandboxManager | None = None) -> None:
        self.config = config
        self._owns = (store is None, manager is None)  # what ``stop`` closes
        self.store = store or ServerStore(config.state_dir)
        self.manager = manager or SandboxManager()
        self.metrics = Metrics(live_sandboxes=lambda: float(self.store.count_live()),
                               exposed_ports=lambda: float(self.store.count_exposed()))
        self.networking = Networking(self)  # exposed ports, egress policies
        self.library = Library(self)  # snapshots, pools
        self.redactor = Redactor([config.state_dir])  # what errors may tell clients
        self._held: dict[str, AsyncSandbox] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._creating: set[str] = set()
        self._commands: dict[str, BackgroundCommand] = {}
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Recovery:
        """Repair what a dead server left (``SandboxManager.recover``), forget owned
        sandboxes that no longer run, and start watching for ones that end."""
        rec = await self.manager.recover()
        live = set(rec.live)
        for sid in self.store.owned():
            if sid not in live:
                self.store.mark_ended(sid)
        self._reaper = asyncio.get_running_loop().create_task(
            self.every(REAP_INTERVAL, self.reap, "reaping ended sandboxes"))
        self.networking.start()
        await self.library.start()
        log.info("sandvm server: %d sandboxes still running, %d repaired", len(live),
                 len(rec.repaired))
        return rec

    async def stop(self) -> None:
        """Detach every sandbox this server holds: they keep running under their keepers
        and a server started later takes them over. The service is unusable afterwards."""
        await self.networking.stop()
        await self.library.stop()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for bg in list(self._commands.values()):  # they end with the server's connection
            await bg.close()
        self._commands.clear()
        for sid, sb in list(self._held.items()):
            self._held.pop(sid, None)
            try:
                await self.manager.detach(sb)
            except SandvmError as exc:
                log.warning("could not detach %s: %s", sid, exc.message)
        if self._owns[0]:
            self.store.close()
        if self._owns[1]:
            self.manager.journal.close()

    @staticmethod
    async def every(seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
        """Run ``job`` every ``seconds`` until cancelled; a failure is logged (``what``
        failed), never fatal: the loop goes on."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("%s failed", what)

    async def reap(self) -> list[str]:
        """Mark owned sandboxes that ended on their own (TTL, crash) and let go of them.
        Returns their ids."""
        ended = []
        for sid in self.store.owned():
            if sid in self._creating:
                continue
            rec = self.manager.journal.get(sid)
            if rec is None or rec.state == "ended" or not keeper_alive(rec):
                if rec is not None and rec.state == "starting" and rec.keeper_pid is None:
                    continue  # another process is creating it
                self.store.mark_ended(sid)
                await self._drop(sid)
                ended.append(sid)
        return ended

    async def _drop(self, sid: str) -> None:
        for cid, bg in list(self._commands.items()):
            if bg.sandbox_id == sid:
                self._commands.pop(cid, None)
                await bg.close()
        sb = self._held.pop(sid, None)
        if sb is not None:
            with contextlib.suppress(SandvmError):
                await sb.kill()  # its VM is gone already: this only closes our side

    # ------------------------------------------------------------------ auth

    def authenticate(self, authorization: str | None) -> str:
        """The tenant of an ``Authorization: Bearer <key>`` header. Raises Unauthenticated."""
        try:
            if not authorization:
                raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'"
                                      " (create a key with `sandvm key create NAME`)")
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthenticated("malformed Authorization header: use 'Bearer <key>'")
            return self.store.tenant_for_key(key.strip())
        except Unauthenticated:
            self.metrics.auth_failures.inc()
            raise

    # ------------------------------------------------------------------ sandboxes

    def _record(self, tenant: str, sandbox_id: str) -> SandboxRecord:
        """The journal record of ``tenant``'s running sandbox. Raises VmNotFound (no such
        sandbox, or another tenant's), SandboxStateError (ended, or still starting)."""
        try:
            validate_vm_id(sandbox_id)
        except InvalidSpec:
            raise _not_found(sandbox_id[:80]) from None
        own = self.store.owner(sandbox_id)
        if own is None or own[0] != tenant:
            raise _not_found(sandbox_id)
        if own[1] is not None:
            raise SandboxStateError(f"sandbox {sandbox_id} has ended")
        rec = self.manager.journal.get(sandbox_id)
        if rec is None or (rec.state == "starting" and sandbox_id in self._creating):
            raise SandboxStateError(f"sandbox {sandbox_id} is still starting")
        if rec.state == "ended" or not keeper_alive(rec):
            self.store.mark_ended(sandbox_id)
            raise SandboxStateError(f"sandbox {sandbox_id} has ended"
                                    + (f" ({rec.end_reason})" if rec.end_reason else ""))
        return rec

    @staticmethod
    def _info(rec: SandboxRecord) -> SandboxInfo:
        spec = rec.record.get("spec") or {}
        return SandboxInfo(sandbox_id=rec.id, state=rec.state.label,
                           image=str(spec.get("image", "?")),
                           memory_mib=int(spec.get("memory_mib", 0)),
                           vcpus=int(spec.get("vcpus", 0)), created=rec.created,
                           expires_at=rec.deadline,
                           network=rec.record.get("network") is not None)

    async def _hold(self, sandbox_id: str) -> AsyncSandbox:
        """This server's handle on a running sandbox, attaching to it (once) if needed.
        Raises SandboxBusy if another process keeps holding it."""
        sb = self._held.get(sandbox_id)
        if sb is not None and await sb.is_running():
            return sb
        lock = self._locks.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            sb = self._held.get(sandbox_id)
            if sb is not None:
                if await sb.is_running():
                    return sb
                await self._drop(sandbox_id)
            sb = await self.manager.attach(sandbox_id, wait=self.config.attach_wait)
            self._held[sandbox_id] = sb
            await self.networking.attached(sandbox_id, sb)  # its exposed ports again
            return sb

    async def _ended_instead(self, sandbox_id: str, exc: SandvmError) -> SandvmError:
        """``exc``, or SandboxStateError if the sandbox ended while the request ran (its
        TTL, a kill: the agent channel breaks when the VM goes, before the journal says
        so). Errors the guest reports (GuestError) are returned as they are."""
        if isinstance(exc, GuestError) or not isinstance(exc, (AgentError, VmError)):
            return exc
        for _ in range(40):  # the keeper records the end just after the VM went
            rec = self.manager.journal.get(sandbox_id)
            if rec is None or rec.state == "ended" or not keeper_alive(rec):
                self.store.mark_ended(sandbox_id)
                await self._drop(sandbox_id)
                reason = f" ({rec.end_reason})" if rec is not None and rec.end_reason else ""
                ended = SandboxStateError(f"sandbox {sandbox_id} ended while the request ran"
                                          + reason)
                ended.__cause__ = exc
                return ended
            await asyncio.sleep(0.05)
        return exc

    async def create(self, tenant: str, *, image: str | None = None, memory_mib: int = 256,
                     vcpus: int = 1, ttl: float | None = None,
                     network: NetworkPolicy | None = None) -> SandboxInfo:
        """Boot a sandbox for ``tenant`` (a managed one, alive ``ttl`` seconds). Raises
        InvalidSpec (over the server's caps), QuotaExceeded, UnknownImage, VmBootError."""
        cfg = self.config
        ttl = self._check_ttl(ttl)
        if memory_mib > cfg.max_memory_mib:
            raise InvalidSpec(f"memory_mib {memory_mib} is over this server's cap of"
                              f" {cfg.max_memory_mib}")
        if vcpus > cfg.max_vcpus:
            raise InvalidSpec(f"vcpus {vcpus} is over this server's cap of {cfg.max_vcpus}")
        if image is None:
            from sandvm.images.store import default_image

            image = default_image()

        async def make(sid: str, ttl: float) -> AsyncSandbox:
            return await self.manager.create(ttl=ttl, sandbox_id=sid, image=image,
                                             memory_mib=memory_mib, vcpus=vcpus,
                                             network=network)

        return await self._new_owned(tenant, memory_mib=memory_mib, ttl=ttl, make=make)

    def _check_ttl(self, ttl: float | None) -> float:
        """``ttl``, or the server's default for None. Raises InvalidSpec over max_ttl."""
        cfg = self.config
        ttl = cfg.default_ttl if ttl is None else ttl
        if not 0 < ttl <= cfg.max_ttl:
            raise InvalidSpec(f"timeout must be seconds in (0, {cfg.max_ttl:.0f}], got {ttl}")
        return ttl

    async def _new_owned(self, tenant: str, *, memory_mib: int, ttl: float | None,
                         make: Callable[[str, float], Awaitable[AsyncSandbox]]
                         ) -> SandboxInfo:
        """A new sandbox of ``tenant``: its quota taken, ``make(sandbox_id, ttl)`` run
        (a managed create or restore), the sandbox held. Raises QuotaExceeded,
        InvalidSpec, and what ``make`` raises."""
        ttl = self._check_ttl(ttl)
        await self.reap()
        sid = new_id("sb")
        self._reserve(sid, tenant, memory_mib)
        self._creating.add(sid)
        t0 = time.monotonic()
        try:
            sb = await make(sid, ttl)
        except BaseException:
            self.store.mark_ended(sid)
            self.metrics.sandboxes_created.inc(outcome="error")
            raise
        finally:
            self._creating.discard(sid)
        self._held[sid] = sb
        self.metrics.sandboxes_created.inc(outcome="ok")
        self.metrics.create_seconds.observe(time.monotonic() - t0)
        return self._info(self._record(tenant, sid))

    def list_sandboxes(self, tenant: str) -> list[SandboxInfo]:
        """``tenant``'s running sandboxes, oldest first."""
        out = []
        for sid in self.store.owned(tenant):
            with contextlib.suppress(SandvmError):
                out.append(self._info(self._record(tenant, sid)))
        return out

    def get(self, tenant: str, sandbox_id: str) -> SandboxInfo:
        """Raises VmNotFound, SandboxStateError (ended)."""
        return self._info(self._record(tenant, sandbox_id))

    async def kill(self, tenant: str, sandbox_id: str) -> None:
        """Destroy the sandbox. Raises VmNotFound, SandboxStateError (already ended)."""
        self._record(tenant, sandbox_id)
        await self._drop(sandbox_id)
        await self.manager.kill(sandbox_id)
        self.store.mark_ended(sandbox_id)

    def set_timeout(self, tenant: str, sandbox_id: str, timeout: float) -> SandboxInfo:
        """Let the sandbox live ``timeout`` more seconds from now. Raises InvalidSpec (over
        the server's max TTL), VmNotFound, SandboxStateError."""
        if not 0 < timeout <= self.config.max_ttl:
            raise InvalidSpec(f"timeout must be seconds in (0, {self.config.max_ttl:.0f}],"
                              f" got {timeout}")
        self._record(tenant, sandbox_id)
        self.manager.set_ttl(sandbox_id, timeout)
        return self.get(tenant, sandbox_id)

    # ------------------------------------------------------------------ quotas

    def _tenant_memory_mib(self, tenant: str) -> int:
        """MiB of memory ``tenant`` holds on this server: its live sandboxes' (those
        being created included) and what its pools may hold."""
        return self.store.memory_in_use(tenant) + self.library.pool_memory_mib(tenant)

    def _check_memory(self, tenant: str, more_mib: int, *, what: str) -> None:
        """Raises QuotaExceeded if ``tenant`` holding ``more_mib`` more would be over its
        memory quota (``what`` says what for)."""
        cap = self.config.max_tenant_memory_mib
        used = self._tenant_memory_mib(tenant)
        if cap is not None and used + more_mib > cap:
            self.metrics.quota_rejections.inc()
            raise QuotaExceeded(f"tenant {tenant!r} holds {used} MiB; {what} would take it"
                                f" over its memory quota of {cap} MiB: kill sandboxes, delete"
                                " a pool or make it smaller")

    def _reserve(self, sid: str, tenant: str, memory_mib: int) -> None:
        """Record ``tenant`` as the owner of the new ``sid`` within its quotas (live
        sandboxes, memory). One SQLite transaction counts the sandboxes and their memory
        and inserts the new one, so concurrent creates (also from another process on
        the same state dir) cannot both pass; the memory the tenant holds outside the
        sandboxes table is read in the same event-loop step (no await in between).
        Raises QuotaExceeded."""
        cfg = self.config
        elsewhere = self._tenant_memory_mib(tenant) - self.store.memory_in_use(tenant)
        refused = self.store.reserve_within(sid, tenant, limit=cfg.max_sandboxes,
                                            memory_mib=memory_mib,
                                            max_memory_mib=cfg.max_tenant_memory_mib,
                                            memory_elsewhere=elsewhere)
        if refused is None:
            return
        self.metrics.quota_rejections.inc()
        if refused == "memory":
            raise QuotaExceeded(
                f"tenant {tenant!r} would hold {self._tenant_memory_mib(tenant) + memory_mib}"
                f" MiB with this sandbox ({memory_mib} MiB), over its memory quota of"
                f" {cfg.max_tenant_memory_mib} MiB: kill a sandbox (DELETE"
                " /v1/sandboxes/ID), wait for one's timeout, or ask for less memory_mib")
        raise QuotaExceeded(f"tenant {tenant!r} already has {cfg.max_sandboxes} live"
                            " sandboxes, its quota: kill one (DELETE /v1/sandboxes/ID)"
                            " or wait for one's timeout")

    # ------------------------------------------------------------------ commands

    async def run_command(self, tenant: str, sandbox_id: str, *, cmd: str | list[str],
                          env: dict[str, str] | None = None, cwd: str | None = None,
                          user: str | None = None, timeout: float | None = 60.0,
                          stdin: bytes | None = None) -> AsyncIterator[dict[str, Any]]:
        """Start nothing yet: check the sandbox and return the command's events (output
        chunks, then one ``exit`` or ``error``); iterating runs the command, and closing
        the iterator early kills it. Raises VmNotFound, SandboxStateError, SandboxBusy."""
        self._record(tenant, sandbox_id)
        sb = await self._hold(sandbox_id)
        return self._command_events(sb, cmd=cmd, env=env, cwd=cwd, user=user,
                                    timeout=timeout, stdin=stdin)

    async def _command_events(self, sb: AsyncSandbox, *, cmd: str | list[str],
                              env: dict[str, str] | None, cwd: str | None, user: str | None,
                              timeout: float | None, stdin: bytes | None
                              ) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(_OUTPUT_QUEUE)
        t0 = time.monotonic()

        async def out(channel: int, data: bytes) -> None:
            await queue.put((channel, data))  # a full queue stops reading the guest

        async def go() -> dict[str, Any]:
            timed_out = False
            try:
                res = await sb.commands._run(cmd, env=env, cwd=cwd, stdin=stdin,
                                             timeout=timeout, on_stdout=None, on_stderr=None,
                                             background=False, check=False, user=user,
                                             raw_output=out)
            except CommandTimeout as exc:
                if exc.result is None:
                    raise
                res, timed_out = exc.result, True
            assert isinstance(res, CommandResult)
            return {"type": "exit", "exit_code": res.exit_code, "signal": res.signal,
                    "timed_out": timed_out, "duration": round(res.duration, 6)}

        task = asyncio.get_running_loop().create_task(go())
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield output_event(*getter.result())
                else:
                    getter.cancel()
            while not queue.empty():  # the command's last output, read before it ended
                yield output_event(*queue.get_nowait())
            try:
                final = task.result()
                self.metrics.commands.inc(outcome="exit")
            except SandvmError as exc:
                err = await self._ended_instead(sb.sandbox_id, exc)
                final = {"type": "error", **self.redactor.public(err, status=status_for(err))}
                self.metrics.commands.inc(outcome="error")
            self.metrics.command_seconds.observe(time.monotonic() - t0)
            yield final
        finally:
            if not task.done():  # the client went away: the command is killed in the guest
                task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # ------------------------------------------------------------------ background commands

    async def start_command(self, tenant: str, sandbox_id: str, *, cmd: str | list[str],
                            env: dict[str, str] | None = None, cwd: str | None = None,
                            user: str | None = None, timeout: float | None = 60.0,
                            stdin: bytes | None = None) -> CommandInfo:
        """Start a command without waiting for it; its output is kept (bounded) for
        ``command_output``. With ``stdin``, that is its whole input (stdin is closed
        after it); without, stdin stays open for ``send_stdin``. Raises VmNotFound,
        SandboxStateError, SandboxBusy, QuotaExceeded (``max_commands`` running),
        CommandNotFound, InvalidSpec."""
        self._record(tenant, sandbox_id)
        sb = await self._hold(sandbox_id)
        cap = self.config.max_commands  # checked and taken with no await in between
        mine = [c for c in self._commands.values() if c.sandbox_id == sandbox_id]
        if len(mine) >= cap:
            done = sorted((c for c in mine if c.final is not None),
                          key=lambda c: c.ended or 0.0)
            if len(mine) - len(done) >= cap:
                raise QuotaExceeded(f"sandbox {sandbox_id} already runs {cap} background"
                                    " commands, this server's cap: wait for one to end")
            for c in done[:len(mine) - cap + 1]:
                self._commands.pop(c.command_id, None)
        bg = BackgroundCommand(command_id=new_id("cmd"), sandbox_id=sandbox_id,
                               tenant=tenant, cmd=cmd,
                               max_buffer=self.config.command_buffer_bytes)
        self._commands[bg.command_id] = bg  # holds its slot while it starts
        t0 = time.monotonic()

        def out(channel: int, data: bytes) -> None:
            bg.append(output_event(channel, data), len(data))

        def ended(c: BackgroundCommand) -> None:
            outcome = "exit" if c.final is not None and c.final["type"] == "exit" else "error"
            self.metrics.commands.inc(outcome=outcome)
            self.metrics.command_seconds.observe(time.monotonic() - t0)

        try:
            handle = await sb.commands._run(cmd, env=env, cwd=cwd, stdin=stdin,
                                            timeout=timeout, on_stdout=None, on_stderr=None,
                                            background=True, check=False, user=user,
                                            raw_output=out)
        except BaseException as exc:
            self._commands.pop(bg.command_id, None)
            self.metrics.commands.inc(outcome="error")
            if isinstance(exc, SandvmError):
                raise await self._ended_instead(sandbox_id, exc) from exc
            raise
        assert isinstance(handle, AsyncCommandHandle)
        if stdin is not None:
            bg.stdin_open = False  # fed whole, then closed (as locally)
        bg.watch(handle, on_end=ended,
                 explain=lambda exc: self._ended_instead(sandbox_id, exc),
                 redactor=self.redactor)
        return bg.info()

    def _command(self, tenant: str, sandbox_id: str, command_id: str) -> BackgroundCommand:
        """Raises VmNotFound, SandboxStateError (the sandbox), ServiceError (404: no such
        command)."""
        self._record(tenant, sandbox_id)
        bg = self._commands.get(command_id)
        if bg is None or bg.sandbox_id != sandbox_id or bg.tenant != tenant:
            raise unknown_command(command_id, sandbox_id)
        return bg

    def list_commands(self, tenant: str, sandbox_id: str) -> list[CommandInfo]:
        """The sandbox's background commands this server keeps, oldest first."""
        self._record(tenant, sandbox_id)
        mine = [c for c in self._commands.values()
                if c.sandbox_id == sandbox_id and c.tenant == tenant]
        return [c.info() for c in sorted(mine, key=lambda c: c.started)]

    def command_info(self, tenant: str, sandbox_id: str, command_id: str) -> CommandInfo:
        return self._command(tenant, sandbox_id, command_id).info()

    def command_output(self, tenant: str, sandbox_id: str, command_id: str, *,
                       offset: int = 0, follow: bool = True) -> AsyncIterator[dict[str, Any]]:
        """The command's events from ``seq`` ``offset`` (checked now, iterated later)."""
        return self._command(tenant, sandbox_id, command_id).follow(offset, follow=follow)

    async def send_stdin(self, tenant: str, sandbox_id: str, command_id: str,
                         data: bytes) -> None:
        """Raises SandboxStateError once the command ended or its stdin is closed."""
        await self._command(tenant, sandbox_id, command_id).send_stdin(data)

    async def close_stdin(self, tenant: str, sandbox_id: str, command_id: str) -> None:
        await self._command(tenant, sandbox_id, command_id).close_stdin()

    async def signal_command(self, tenant: str, sandbox_id: str, command_id: str, *,
                             signal: int | str, grace: float | None = None) -> None:
        await self._command(tenant, sandbox_id, command_id).send_signal(signal, grace=grace)

    # ------------------------------------------------------------------ files

    async def upload(self, tenant: str, sandbox_id: str, path: str,
                     body: AsyncIterator[bytes], *, length: int | None = None,
                     mode: int = 0o644, make_parents: bool = True) -> WriteResult:
        """Write ``body`` to ``path`` in the guest as it arrives (atomically: the file
        appears whole or not at all), at most ``max_upload_bytes``. Raises
        RequestTooLarge, InvalidPath, GuestError (e.g. GuestPermissionDenied),
        VmNotFound, SandboxStateError."""
        check_guest_path(path)
        cap = self.config.max_upload_bytes
        if length is not None and length > cap:
            raise RequestTooLarge(f"the file is {length} bytes; this server takes at most"
                                  f" {cap} per upload")
        if not 0 <= mode <= 0o7777:
            raise InvalidSpec(f"mode must be 0..0o7777, got {mode:o}")
        self._record(tenant, sandbox_id)
        sb = await self._hold(sandbox_id)
        # the agent's write_file stream, fed chunk by chunk with its flow control (the
        # public files.write takes the whole content at once)
        st = await GuestOps(sb.connection()).write_file(path=path, mode=mode,
                                                        make_parents=make_parents)
        sent = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                sent += len(chunk)
                if sent > cap:
                    raise RequestTooLarge(f"the upload is over this server's cap of {cap}"
                                          " bytes")
                try:
                    await st.send_data(chunk)
                except SandvmError:
                    if not st.closed:
                        raise
                    break  # the guest refused: its error is in the stream
            else:
                await st.send_eof()
            while True:
                item = await st.next(sb.op_timeout)
                if item.kind == "reply":
                    size = guest_int(item.message or {}, "size", what="write report")
                    if size != sent:
                        raise AgentProtocolError(f"guest reports {size!r} bytes, sent {sent}")
                    self.metrics.file_bytes.inc(sent, direction="upload")
                    return WriteResult(path=path, size=sent)
                if item.kind == "error":
                    assert item.error is not None
                    raise item.error
        finally:
            await st.reset()  # no-op once the guest replied; otherwise it drops the temp file

    async def download(self, tenant: str, sandbox_id: str, path: str, *,
                       max_bytes: int | None = None) -> AsyncIterator[bytes]:
        """The guest file ``path``, chunk by chunk. Failures the guest reports before
        the first byte (GuestFileNotFound, FileTooLarge over ``max_bytes`` or the
        server's cap, GuestError for a directory) are raised here, so they get their
        own status; a later failure ends the stream early (the client sees a truncated
        chunked body). Raises InvalidPath, VmNotFound, SandboxStateError too."""
        check_guest_path(path)
        cap = self.config.max_download_bytes if max_bytes is None else min(
            max_bytes, self.config.max_download_bytes)
        self._record(tenant, sandbox_id)
        sb = await self._hold(sandbox_id)
        source = sb.files.read_stream(path, max_bytes=cap)
        try:
            first = await source.__anext__()
        except StopAsyncIteration:
            first = b""
        except BaseException:
            await source.aclose()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            try:
                if first:
                    self.metrics.file_bytes.inc(len(first), direction="download")
                    yield first
                async for chunk in source:
                    self.metrics.file_bytes.inc(len(chunk), direction="download")
                    yield chunk
            finally:
                await source.aclose()

        return chunks()


def ndjson(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
