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
from typing import Any, TypeVar

from sandvm.core import check_guest_path, new_id
from sandvm.egress import NetworkPolicy
from sandvm.errors import (
    InvalidSpec,
    QuotaExceeded,
    RequestTooLarge,
    SandvmError,
    Unauthenticated,
)
from sandvm.files import tar_from_guest, untar_to_guest
from sandvm.output import OutputPipe, exit_event, output_event, wait_outcome
from sandvm.providers.base import SandboxProvider
from sandvm.runtime.journal import SandboxRecord
from sandvm.runtime.manager import Recovery, SandboxManager
from sandvm.sandbox import AsyncCommandHandle, AsyncSandbox, CommandResult
from sandvm.server.commands import BackgroundCommand, unknown_command
from sandvm.server.config import ServerConfig
from sandvm.server.library import Library
from sandvm.server.metrics import Metrics
from sandvm.server.models import CommandInfo, SandboxInfo, WriteResult
from sandvm.server.networking import Networking
from sandvm.server.redact import Redactor, status_for
from sandvm.server.store import ServerStore
from sandvm.server.tenancy import Tenancy, every
from sandvm.values import DEFAULT_TREE_ENTRIES, DirTransfer

log = logging.getLogger("sandvm.server")

_OUTPUT_QUEUE = 16  # output chunks between the guest and a slow HTTP client
_T = TypeVar("_T")



class SandboxService:
    """Tenants' sandboxes. ``start`` before use, ``stop`` at the end (detaches all).

    ``provider`` (for a manager it makes): None for QEMU, or another SandboxProvider,
    e.g. ``InMemoryVmProvider()`` for API-level tests without QEMU (`sandvm serve
    --provider memory`): its sandboxes run inside the server and end when it stops;
    what that provider cannot do (commands and files on the fake, snapshots, forks,
    pools, pause to disk) is refused (Unsupported, HTTP 501; a guest op the fake does
    not run is GuestError, HTTP 400)."""

    def __init__(self, config: ServerConfig, *, store: ServerStore | None = None,
                 manager: SandboxManager | None = None,
                 provider: SandboxProvider | None = None) -> None:
        if manager is not None and provider is not None:
            raise InvalidSpec("give SandboxService a manager or a provider, not both")
        self.config = config
        self._owns = (store is None, manager is None)  # what ``stop`` closes
        self.store = store or ServerStore(config.state_dir)
        self.manager = manager or SandboxManager(provider=provider)
        self.metrics = Metrics(live_sandboxes=lambda: float(self.store.count_live()),
                               exposed_ports=lambda: float(self.store.count_exposed()))
        # ownership, quotas, held sandboxes, error explanations: injected where used
        self.tenancy = Tenancy(config, store=self.store, manager=self.manager,
                               metrics=self.metrics)
        self.networking = Networking(self.tenancy)  # exposed ports, egress policies
        self.library = Library(self.tenancy)  # snapshots, pools
        self.redactor = Redactor([config.state_dir])  # what errors may tell clients
        self._commands: dict[str, BackgroundCommand] = {}
        self.tenancy.on_attach(self.networking.attached)  # its exposed ports again
        self.tenancy.on_drop(self._close_commands)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Recovery:
        """Repair what a dead server left (``SandboxManager.recover``), forget owned
        sandboxes that no longer run, and start watching for ones that end."""
        rec = await self.tenancy.start()
        self.networking.start()
        await self.library.start()
        log.info("sandvm server: %d sandboxes still running, %d repaired", len(rec.live),
                 len(rec.repaired))
        return rec

    async def stop(self) -> None:
        """Detach every sandbox this server holds: they keep running under their keepers
        and a server started later takes them over. The service is unusable afterwards."""
        await self.networking.stop()
        await self.library.stop()
        for bg in list(self._commands.values()):  # they end with the server's connection
            await bg.close()
        self._commands.clear()
        await self.tenancy.stop()  # detaches every held sandbox
        if self._owns[0]:
            self.store.close()
        if self._owns[1]:
            self.manager.journal.close()

    every = staticmethod(every)  # run a job periodically (``tenancy.every``)

    async def reap(self) -> list[str]:
        """Mark owned sandboxes that ended on their own (TTL, crash) and let go of them.
        Returns their ids."""
        return await self.tenancy.reap()

    async def _close_commands(self, sid: str) -> None:
        """The server lets go of ``sid``: its background commands end here."""
        for cid, bg in list(self._commands.items()):
            if bg.sandbox_id == sid:
                self._commands.pop(cid, None)
                await bg.close()

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
        """``tenancy.record``: raises VmNotFound, SandboxStateError."""
        return self.tenancy.record(tenant, sandbox_id)

    async def _hold(self, sandbox_id: str) -> AsyncSandbox:
        """``tenancy.hold``: raises SandboxBusy."""
        return await self.tenancy.hold(sandbox_id)

    async def _ended_instead(self, sandbox_id: str, exc: SandvmError) -> SandvmError:
        """``tenancy.explain``: ``exc``, or SandboxStateError if the sandbox ended."""
        return await self.tenancy.explain(sandbox_id, exc)

    async def create(self, tenant: str, *, image: str | None = None, memory_mib: int = 256,
                     vcpus: int = 1, ttl: float | None = None,
                     network: NetworkPolicy | None = None) -> SandboxInfo:
        """Boot a sandbox for ``tenant`` (a managed one, alive ``ttl`` seconds). Raises
        InvalidSpec (over the server's caps), QuotaExceeded, UnknownImage, VmBootError."""
        ttl = self.tenancy.check_ttl(ttl)
        self.tenancy.check_size(memory_mib=memory_mib, vcpus=vcpus)
        if image is None:
            from sandvm.images.store import default_image

            image = default_image()

        async def make(sid: str, ttl: float) -> AsyncSandbox:
            return await self.manager.create(ttl=ttl, sandbox_id=sid, image=image,
                                             memory_mib=memory_mib, vcpus=vcpus,
                                             network=network)

        return await self.tenancy.new_owned(tenant, memory_mib=memory_mib, ttl=ttl, make=make)

    def list_sandboxes(self, tenant: str) -> list[SandboxInfo]:
        """``tenant``'s running sandboxes, oldest first."""
        return self.tenancy.live(tenant)

    def get(self, tenant: str, sandbox_id: str) -> SandboxInfo:
        """Raises VmNotFound, SandboxStateError (ended)."""
        return self.tenancy.info(tenant, sandbox_id)

    async def kill(self, tenant: str, sandbox_id: str) -> None:
        """Destroy the sandbox. Raises VmNotFound, SandboxStateError (already ended)."""
        self._record(tenant, sandbox_id)
        await self.tenancy.drop(sandbox_id)
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
        pipe = OutputPipe(max_chunks=_OUTPUT_QUEUE)  # full: stops reading the guest
        out = pipe.put
        t0 = time.monotonic()

        async def run() -> CommandResult:
            return await sb.commands.run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                                         check=False, user=user, on_output=out)

        async def go() -> dict[str, Any]:
            try:
                res, timed_out = await wait_outcome(run())
                assert res is not None  # a timeout without a result is raised
                return exit_event(res, timed_out=timed_out)
            finally:
                pipe.close()

        task = asyncio.get_running_loop().create_task(go())
        try:
            while (chunk := await pipe.get()) is not None:  # to the command's last output
                yield output_event(*chunk)
            try:
                final = await task
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
            handle = await sb.commands.start(cmd, env=env, cwd=cwd, stdin=stdin,
                                             timeout=timeout, check=False, user=user,
                                             on_output=out)
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

        async def capped() -> AsyncIterator[bytes]:
            sent = 0
            async for chunk in body:
                sent += len(chunk)
                if sent > cap:
                    raise RequestTooLarge(f"the upload is over this server's cap of {cap}"
                                          " bytes")
                yield chunk

        info = await sb.files.write_stream(path, capped(), mode=mode,
                                           make_parents=make_parents)
        self.metrics.file_bytes.inc(info.size, direction="upload")
        return WriteResult(path=path, size=info.size)

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

    # ------------------------------------------------------------------ more of the local surface

    async def on_sandbox(self, tenant: str, sandbox_id: str,
                         op: Callable[[AsyncSandbox], Awaitable[_T]]) -> _T:
        """Run ``op`` on ``tenant``'s running sandbox, held by this server: how the routes
        reach the sandbox's own methods (files.stat, pause, ping, ...). A failure
        because the sandbox ended meanwhile comes out as SandboxStateError. Raises
        VmNotFound, SandboxStateError, SandboxBusy, and what ``op`` raises."""
        self._record(tenant, sandbox_id)
        sb = await self._hold(sandbox_id)
        try:
            return await op(sb)
        except SandvmError as exc:
            err = await self._ended_instead(sandbox_id, exc)
            if err is exc:
                raise
            raise err from exc

    def vm_facts(self, sandbox_id: str) -> dict[str, Any]:
        """What is known of a sandbox's VM beyond its record (the local ``info``'s
        accelerator, boot_seconds, guest_kernel, agent_version): None where unknown,
        e.g. for a sandbox this server does not hold now."""
        facts: dict[str, Any] = dict.fromkeys(
            ("accelerator", "boot_seconds", "guest_kernel", "agent_version"))
        rec = self.manager.journal.get(sandbox_id)
        if rec is not None and isinstance(rec.record.get("accelerator"), str):
            facts["accelerator"] = rec.record["accelerator"]
        sb = self.tenancy.holding(sandbox_id)
        if sb is not None:
            with contextlib.suppress(SandvmError, AttributeError):
                info = sb.info
                facts.update({k: info[k] for k in facts if info.get(k) is not None})
        return facts

    async def upload_tree(self, tenant: str, sandbox_id: str, path: str,
                          body: AsyncIterator[bytes], *, length: int | None = None
                          ) -> DirTransfer:
        """Extract the tar stream ``body`` into the guest directory ``path`` as it
        arrives (``files.upload_dir``'s checks in the guest), at most
        ``max_upload_bytes``. Raises RequestTooLarge, InvalidPath, GuestError,
        VmNotFound, SandboxStateError."""
        check_guest_path(path)
        cap = self.config.max_upload_bytes
        if length is not None and length > cap:
            raise RequestTooLarge(f"the tree is {length} bytes; this server takes at most"
                                  f" {cap} per upload")

        async def capped() -> AsyncIterator[bytes]:
            sent = 0
            async for chunk in body:
                sent += len(chunk)
                if sent > cap:
                    raise RequestTooLarge(f"the upload is over this server's cap of {cap}"
                                          " bytes")
                yield chunk
            self.metrics.file_bytes.inc(sent, direction="upload")

        return await self.on_sandbox(tenant, sandbox_id,
                                     lambda sb: untar_to_guest(sb, path, capped()))

    async def download_tree(self, tenant: str, sandbox_id: str, path: str, *,
                            max_bytes: int | None = None, max_files: int | None = None
                            ) -> AsyncIterator[dict[str, Any]]:
        """The guest directory ``path`` as a tar stream (not extracted: the client does
        that, treating it as hostile) in events: ``data`` (``b64``), then ``end``
        (``skipped``: what the guest left out) or ``error``. Its file content is capped
        by ``max_bytes`` and the server's ``max_download_bytes``. Failures before the
        first byte (GuestFileNotFound, FileTooLarge, GuestError) are raised here, so
        they get their own status. Raises InvalidPath, VmNotFound, SandboxStateError."""
        check_guest_path(path)
        cap = self.config.max_download_bytes if max_bytes is None else min(
            max_bytes, self.config.max_download_bytes)
        entries = DEFAULT_TREE_ENTRIES if max_files is None else max_files
        self._record(tenant, sandbox_id)
        sb = await self._hold(sandbox_id)
        skipped: list[str] = []
        source = tar_from_guest(sb, path, skipped, max_bytes=cap, max_files=entries)
        try:
            first = await source.__anext__()
        except StopAsyncIteration:
            first = b""
        except BaseException:
            await source.aclose()
            raise

        def data(chunk: bytes) -> dict[str, Any]:
            self.metrics.file_bytes.inc(len(chunk), direction="download")
            return {"type": "data", "b64": base64.b64encode(chunk).decode()}

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                if first:
                    yield data(first)
                async for chunk in source:
                    yield data(chunk)
                yield {"type": "end", "skipped": skipped}
            except SandvmError as exc:
                err = await self._ended_instead(sandbox_id, exc)
                yield {"type": "error", **self.redactor.public(err, status=status_for(err))}
            finally:
                await source.aclose()

        return events()


def ndjson(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
