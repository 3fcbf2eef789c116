"""Who owns what on the server, and what they may take: the ``Tenancy`` component.

One place decides, for every route of the HTTP API (and any adapter on the same
service):

- ownership: a sandbox belongs to the tenant whose key made it (the server's store
  records it). A sandbox that does not exist and one of another tenant are the same
  to the caller: VmNotFound. An ended one is SandboxStateError.
- quotas: live sandboxes, memory (sandboxes and pools together), exposed ports,
  snapshots (count and bytes), pools; QuotaExceeded says what to do.
- holding: the server's handle on each running sandbox it uses (attached once, one
  holder at a time as the manager wants), dropped when the sandbox ends, detached
  when the server stops.
- explanations: a request that failed because its sandbox ended meanwhile (its TTL,
  a kill: the agent channel breaks before the journal says so) is told as
  SandboxStateError, not as the channel's error.

``SandboxService``, ``Library`` and ``Networking`` get one ``Tenancy`` injected and
use only its public methods. It needs no VM to decide: give it a store, a manager
(only its journal is read for decisions) and the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

from sandvm.core import new_id, validate_vm_id
from sandvm.errors import (
    AgentError,
    GuestError,
    InvalidSpec,
    QuotaExceeded,
    SandboxStateError,
    SandvmError,
    VmError,
    VmNotFound,
)
from sandvm.runtime.journal import JournalState, SandboxRecord
from sandvm.runtime.manager import Recovery, SandboxManager, keeper_alive
from sandvm.sandbox import AsyncSandbox
from sandvm.server.config import ServerConfig
from sandvm.server.metrics import Metrics
from sandvm.server.models import SandboxInfo
from sandvm.server.store import ServerStore

__all__ = ["REAP_INTERVAL", "Tenancy", "every", "not_found", "sandbox_info"]

log = logging.getLogger("sandvm.server")

REAP_INTERVAL = 2.0  # seconds between looks for sandboxes that ended on their own
ENDED_POLLS = 40  # looks at the journal (every 50 ms) for an end behind a failure

AttachHook = Callable[[str, AsyncSandbox], Awaitable[None]]
DropHook = Callable[[str], Awaitable[None]]


def not_found(sandbox_id: str) -> VmNotFound:
    """The 404 for a sandbox the caller does not own (missing or another tenant's)."""
    exc = VmNotFound(sandbox_id)
    exc.message = f"no sandbox {sandbox_id!r}"
    exc.args = (exc.message,)
    return exc


def sandbox_info(rec: SandboxRecord) -> SandboxInfo:
    """What the API tells of a managed sandbox, from its journal record."""
    spec = rec.record.get("spec") or {}
    return SandboxInfo(sandbox_id=rec.id, state=rec.state.label,
                       image=str(spec.get("image", "?")),
                       memory_mib=int(spec.get("memory_mib", 0)),
                       vcpus=int(spec.get("vcpus", 0)), created=rec.created,
                       expires_at=rec.deadline,
                       network=rec.record.get("network") is not None)


async def every(seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``job`` every ``seconds`` until cancelled; a failure is logged (``what``
    failed), never fatal: the loop goes on."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception("%s failed", what)


class Tenancy:
    """Ownership, quotas, held sandboxes and error explanations of one server.

    ``start`` before use (repairs what a dead server left, starts reaping), ``stop``
    at the end (detaches every held sandbox: they run on under their keepers)."""

    def __init__(self, config: ServerConfig, *, store: ServerStore, manager: SandboxManager,
                 metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.manager = manager
        self.metrics = metrics
        self._held: dict[str, AsyncSandbox] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._creating: set[str] = set()
        self._attach_hooks: list[AttachHook] = []
        self._drop_hooks: list[DropHook] = []
        self._reaper: asyncio.Task[None] | None = None

    def on_attach(self, hook: AttachHook) -> None:
        """Call ``hook(sandbox_id, sandbox)`` each time a running sandbox is attached
        again (e.g. to listen for its exposed ports). A hook must not raise."""
        self._attach_hooks.append(hook)

    def on_drop(self, hook: DropHook) -> None:
        """Call ``hook(sandbox_id)`` before the server lets go of an ended sandbox (e.g.
        to end its background commands). A hook must not raise."""
        self._drop_hooks.append(hook)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Recovery:
        """Repair what a dead server left (``SandboxManager.recover``), forget owned
        sandboxes that no longer run, and start reaping ones that end."""
        rec = await self.manager.recover()
        live = set(rec.live)
        for sid in self.store.owned():
            if sid not in live:
                self.store.mark_ended(sid)
        self._reaper = asyncio.get_running_loop().create_task(
            every(REAP_INTERVAL, self.reap, "reaping ended sandboxes"))
        return rec

    async def stop(self) -> None:
        """Stop reaping and detach every held sandbox (they keep running under their
        keepers; a server started later takes them over). Sandboxes the manager runs in
        this process (a provider but QEMU's) are killed instead."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for sid, sb in list(self._held.items()):
            self._held.pop(sid, None)
            if self.manager.runs_here(sid):  # in this process (not QEMU): ends with it
                await self.manager.kill(sid, reason="ended: its server stopped")
                self.store.mark_ended(sid)
                continue
            try:
                await self.manager.detach(sb)
            except SandvmError as exc:
                log.warning("could not detach %s: %s", sid, exc.message)
        await self.manager.close()  # any other sandbox run in this process

    async def reap(self) -> list[str]:
        """Mark owned sandboxes that ended on their own (TTL, crash) and let go of them.
        Returns their ids."""
        ended = []
        for sid in self.store.owned():
            if sid in self._creating:
                continue
            rec = self.manager.journal.get(sid)
            if rec is None or rec.state == JournalState.ENDED or not keeper_alive(rec):
                if rec is not None and rec.state == JournalState.STARTING and \
                        rec.keeper_pid is None:
                    continue  # another process is creating it
                self.store.mark_ended(sid)
                await self.drop(sid)
                ended.append(sid)
        return ended

    # ------------------------------------------------------------------ ownership

    def record(self, tenant: str, sandbox_id: str) -> SandboxRecord:
        """The journal record of ``tenant``'s running sandbox. Raises VmNotFound (no such
        sandbox, or another tenant's), SandboxStateError (ended, or still starting)."""
        try:
            validate_vm_id(sandbox_id)
        except InvalidSpec:
            raise not_found(sandbox_id[:80]) from None
        own = self.store.owner(sandbox_id)
        if own is None or own[0] != tenant:
            raise not_found(sandbox_id)
        if own[1] is not None:
            raise SandboxStateError(f"sandbox {sandbox_id} has ended")
        rec = self.manager.journal.get(sandbox_id)
        if rec is None or (rec.state == JournalState.STARTING and sandbox_id in self._creating):
            raise SandboxStateError(f"sandbox {sandbox_id} is still starting")
        if rec.state == JournalState.ENDED or not keeper_alive(rec):
            self.store.mark_ended(sandbox_id)
            raise SandboxStateError(f"sandbox {sandbox_id} has ended"
                                    + (f" ({rec.end_reason})" if rec.end_reason else ""))
        return rec

    def info(self, tenant: str, sandbox_id: str) -> SandboxInfo:
        """``tenant``'s running sandbox as the API shows it. Raises as ``record``."""
        return sandbox_info(self.record(tenant, sandbox_id))

    def live(self, tenant: str) -> list[SandboxInfo]:
        """``tenant``'s running sandboxes, oldest first."""
        out = []
        for sid in self.store.owned(tenant):
            with contextlib.suppress(SandvmError):
                out.append(self.info(tenant, sid))
        return out

    def release(self, sandbox_id: str) -> None:
        """The sandbox ended, or its reservation is given up: its quota is free."""
        self.store.mark_ended(sandbox_id)

    @contextlib.contextmanager
    def creating(self, sandbox_ids: Iterable[str]) -> Iterator[None]:
        """While in this block, the reserved ``sandbox_ids`` are being made: never
        reaped, and ``record`` says they are still starting."""
        ids = set(sandbox_ids)
        self._creating.update(ids)
        try:
            yield
        finally:
            self._creating.difference_update(ids)

    # ------------------------------------------------------------------ holding

    async def hold(self, sandbox_id: str) -> AsyncSandbox:
        """This server's handle on a running sandbox (check ownership first with
        ``record``), attaching to it (once) if needed. Raises SandboxBusy if another
        process keeps holding it, and what ``SandboxManager.attach`` raises."""
        sb = self._held.get(sandbox_id)
        if sb is not None and await sb.is_running():
            return sb
        lock = self._locks.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            sb = self._held.get(sandbox_id)
            if sb is not None:
                if await sb.is_running():
                    return sb
                await self.drop(sandbox_id)
            sb = await self.manager.attach(sandbox_id, wait=self.config.attach_wait)
            self._held[sandbox_id] = sb
            for hook in self._attach_hooks:  # e.g. its exposed ports again
                await hook(sandbox_id, sb)
            return sb

    async def held(self, tenant: str, sandbox_id: str) -> AsyncSandbox:
        """``record`` then ``hold``: the handle on ``tenant``'s running sandbox. Raises
        VmNotFound, SandboxStateError, SandboxBusy."""
        self.record(tenant, sandbox_id)
        return await self.hold(sandbox_id)

    def holding(self, sandbox_id: str) -> AsyncSandbox | None:
        """The handle this server holds on the sandbox now, or None (never attaches)."""
        return self._held.get(sandbox_id)

    def adopt(self, sandbox_id: str, sb: AsyncSandbox) -> None:
        """Hold ``sb``, a sandbox this server just made (created, restored, forked or
        handed out by a pool)."""
        self._held[sandbox_id] = sb

    async def drop(self, sandbox_id: str) -> None:
        """Let go of an ended sandbox: the drop hooks run, then the server's side of
        its handle is closed (its VM is gone already). Never raises SandvmError."""
        for hook in self._drop_hooks:
            await hook(sandbox_id)
        sb = self._held.pop(sandbox_id, None)
        if sb is not None:
            with contextlib.suppress(SandvmError):
                await sb.kill()  # its VM is gone already: this only closes our side

    # ------------------------------------------------------------------ explanations

    async def explain(self, sandbox_id: str, exc: SandvmError) -> SandvmError:
        """``exc``, or SandboxStateError if the sandbox ended while the request ran (its
        TTL, a kill: the agent channel breaks when the VM goes, before the journal says
        so; then the sandbox is let go of). Errors the guest reports (GuestError) are
        returned as they are."""
        if isinstance(exc, GuestError) or not isinstance(exc, (AgentError, VmError)):
            return exc
        for _ in range(ENDED_POLLS):  # the keeper records the end just after the VM went
            rec = self.manager.journal.get(sandbox_id)
            if rec is None or rec.state == JournalState.ENDED or not keeper_alive(rec):
                self.store.mark_ended(sandbox_id)
                await self.drop(sandbox_id)
                reason = f" ({rec.end_reason})" if rec is not None and rec.end_reason else ""
                ended = SandboxStateError(f"sandbox {sandbox_id} ended while the request ran"
                                          + reason)
                ended.__cause__ = exc
                return ended
            await asyncio.sleep(0.05)
        return exc

    # ------------------------------------------------------------------ quotas

    def check_ttl(self, ttl: float | None) -> float:
        """``ttl``, or the server's default for None. Raises InvalidSpec over max_ttl."""
        cfg = self.config
        ttl = cfg.default_ttl if ttl is None else ttl
        if not 0 < ttl <= cfg.max_ttl:
            raise InvalidSpec(f"timeout must be seconds in (0, {cfg.max_ttl:.0f}], got {ttl}")
        return ttl

    def check_size(self, *, memory_mib: int, vcpus: int) -> None:
        """Raises InvalidSpec if a sandbox of that size is over the server's caps."""
        cfg = self.config
        if memory_mib > cfg.max_memory_mib:
            raise InvalidSpec(f"memory_mib {memory_mib} is over this server's cap of"
                              f" {cfg.max_memory_mib}")
        if vcpus > cfg.max_vcpus:
            raise InvalidSpec(f"vcpus {vcpus} is over this server's cap of {cfg.max_vcpus}")

    def tenant_memory_mib(self, tenant: str) -> int:
        """MiB of memory ``tenant`` holds on this server: its live sandboxes' (those
        being created included) and what its pools may hold."""
        return self.store.memory_in_use(tenant) + self.store.pool_memory_mib(tenant)

    def check_memory(self, tenant: str, more_mib: int, *, what: str) -> None:
        """Raises QuotaExceeded if ``tenant`` holding ``more_mib`` more would be over its
        memory quota (``what`` says what for)."""
        cap = self.config.max_tenant_memory_mib
        used = self.tenant_memory_mib(tenant)
        if cap is not None and used + more_mib > cap:
            self.metrics.quota_rejections.inc()
            raise QuotaExceeded(f"tenant {tenant!r} holds {used} MiB; {what} would take it"
                                f" over its memory quota of {cap} MiB: kill sandboxes, delete"
                                " a pool or make it smaller")

    def reserve(self, sandbox_id: str, tenant: str, *, memory_mib: int) -> None:
        """Record ``tenant`` as the owner of the new ``sandbox_id`` within its quotas
        (live sandboxes, memory). One SQLite transaction counts the sandboxes and their
        memory and inserts the new one, so concurrent creates (also from another
        process on the same state dir) cannot both pass; the memory the tenant holds
        outside the sandboxes table is read just before, with no await in between.
        ``release`` gives the reservation up. Raises QuotaExceeded."""
        cfg = self.config
        elsewhere = self.tenant_memory_mib(tenant) - self.store.memory_in_use(tenant)
        refused = self.store.reserve_within(sandbox_id, tenant, limit=cfg.max_sandboxes,
                                            memory_mib=memory_mib,
                                            max_memory_mib=cfg.max_tenant_memory_mib,
                                            memory_elsewhere=elsewhere)
        if refused is None:
            return
        self.metrics.quota_rejections.inc()
        if refused == "memory":
            raise QuotaExceeded(
                f"tenant {tenant!r} would hold {self.tenant_memory_mib(tenant) + memory_mib}"
                f" MiB with this sandbox ({memory_mib} MiB), over its memory quota of"
                f" {cfg.max_tenant_memory_mib} MiB: kill a sandbox (DELETE"
                " /v1/sandboxes/ID), wait for one's timeout, or ask for less memory_mib")
        raise QuotaExceeded(f"tenant {tenant!r} already has {cfg.max_sandboxes} live"
                            " sandboxes, its quota: kill one (DELETE /v1/sandboxes/ID)"
                            " or wait for one's timeout")

    def reserve_all(self, sandbox_ids: list[str], tenant: str, *, memory_mib: int) -> None:
        """``reserve`` each of ``sandbox_ids`` (``memory_mib`` each): all or none.
        Raises QuotaExceeded."""
        for i, sid in enumerate(sandbox_ids):
            try:
                self.reserve(sid, tenant, memory_mib=memory_mib)
            except BaseException:
                for done in sandbox_ids[:i]:
                    self.release(done)
                raise

    def reserve_port(self, tenant: str, sandbox_id: str, port: int, host: str) -> None:
        """Record guest ``port`` of ``tenant``'s ``sandbox_id`` as exposed on ``host``
        within the tenant's port quota (a port recorded already passes). Raises
        QuotaExceeded."""
        limit = self.config.max_tenant_ports
        if not self.store.reserve_port(sandbox_id, port, host, limit=limit):
            raise QuotaExceeded(f"tenant {tenant!r} already has {limit} ports exposed, its"
                                " quota: close one (DELETE /v1/sandboxes/ID/ports/PORT)")

    def check_snapshot_count(self, tenant: str, count: int) -> None:
        """Raises QuotaExceeded if ``tenant``, holding ``count`` snapshots, may not take
        another."""
        cap = self.config.max_snapshots
        if count >= cap:
            self.metrics.quota_rejections.inc()
            raise QuotaExceeded(f"tenant {tenant!r} has {cap} snapshots, its quota:"
                                " delete one (DELETE /v1/snapshots/NAME)")

    def check_snapshot_bytes(self, tenant: str, used: int, cap: int | None) -> None:
        """Raises QuotaExceeded if ``tenant``'s snapshots take ``used`` bytes, at or over
        its byte quota ``cap`` (None: none)."""
        if cap is not None and used >= cap:
            self.metrics.quota_rejections.inc()
            raise QuotaExceeded(f"the snapshots of tenant {tenant!r} take {used}"
                                f" bytes on disk, its quota is {cap}: delete"
                                " one (DELETE /v1/snapshots/NAME)")

    def snapshot_too_big(self, tenant: str, name: str, exc: QuotaExceeded,
                         cap: int | None) -> QuotaExceeded:
        """The client's account of the snapshot store refusing snapshot ``name`` over
        the tenant's byte quota ``cap`` (the store's own message names server paths)."""
        self.metrics.quota_rejections.inc()
        d = exc.details
        return QuotaExceeded(
            f"snapshot {name!r} takes {d.get('size', '?')} bytes on disk; with it"
            f" the snapshots of tenant {tenant!r} would take {d.get('used', '?')},"
            f" over its quota of {cap} bytes: nothing was kept; delete a"
            " snapshot (DELETE /v1/snapshots/NAME)")

    def check_pools(self, tenant: str, *, max_size: int, memory_mib: int) -> None:
        """Raises QuotaExceeded if ``tenant`` may not keep another pool of up to
        ``max_size`` sandboxes of ``memory_mib`` each (``max_pools``, ``max_pool_size``
        over its pools, its memory)."""
        cfg = self.config
        n, held = self.store.pool_totals(tenant)
        if n >= cfg.max_pools:
            raise QuotaExceeded(f"tenant {tenant!r} has {n} pools, its quota: delete"
                                " one (DELETE /v1/pools/NAME)")
        if held + max_size > cfg.max_pool_size:
            raise QuotaExceeded(f"the pools of tenant {tenant!r} hold up to {held}"
                                " sandboxes;"
                                f" {max_size} more is over this server's cap of"
                                f" {cfg.max_pool_size} waiting sandboxes per tenant:"
                                " make max_size smaller or delete a pool")
        self.check_memory(tenant, max_size * memory_mib,
                          what=f"a pool of up to {max_size} sandboxes of {memory_mib} MiB")

    # ------------------------------------------------------------------ new sandboxes

    async def new_owned(self, tenant: str, *, memory_mib: int, ttl: float | None,
                        make: Callable[[str, float], Awaitable[AsyncSandbox]]
                        ) -> SandboxInfo:
        """A new sandbox of ``tenant``: its quota taken, ``make(sandbox_id, ttl)`` run
        (a managed create or restore), the sandbox held. Raises QuotaExceeded,
        InvalidSpec, and what ``make`` raises."""
        ttl = self.check_ttl(ttl)
        await self.reap()
        sid = new_id("sb")
        self.reserve(sid, tenant, memory_mib=memory_mib)
        t0 = time.monotonic()
        with self.creating([sid]):
            try:
                sb = await make(sid, ttl)
            except BaseException:
                self.release(sid)
                self.metrics.sandboxes_created.inc(outcome="error")
                raise
        self.adopt(sid, sb)
        self.metrics.sandboxes_created.inc(outcome="ok")
        self.metrics.create_seconds.observe(time.monotonic() - t0)
        return self.info(tenant, sid)
