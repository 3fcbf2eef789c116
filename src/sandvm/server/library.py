"""Tenants' snapshots and warm pools on the server, and sandboxes made from them.

Snapshots live in one store per tenant (``<state dir>/snapshots/<tenant>``): a name
is only ever looked up in the caller's own store, so another tenant's snapshot is
SnapshotNotFound (404), as a missing one. Every sandbox made here (restored from a
snapshot, forked, handed out by a pool) is a managed one, restored under a keeper
(``SandboxManager.from_snapshot``), so it outlives the server like a booted one.

A pool keeps ``min_size`` sandboxes restored and waiting (at most ``max_size``). Its
waiting sandboxes belong to nobody: they are recorded as pool members, and a server
that starts kills the members a dead server left and starts its pools again (pools
are kept in the server's database). ``POST /v1/sandboxes {"pool": NAME}`` takes one:
it becomes the tenant's sandbox (counted in its quotas, its TTL set) and the pool
restores another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from sandvm.core import new_id, validate_vm_id
from sandvm.egress import NetworkPolicy
from sandvm.errors import (
    InvalidSpec,
    PoolError,
    PoolExhausted,
    PoolExists,
    PoolNotFound,
    QuotaExceeded,
    SandvmError,
    SnapshotAlreadyExists,
    SnapshotCorrupt,
    SnapshotIncompatible,
    SnapshotInUse,
    SnapshotNotFound,
    Unsupported,
)
from sandvm.pools.pool import AsyncPool
from sandvm.sandbox import AsyncSandbox
from sandvm.server.models import PoolInfo, SandboxInfo, SnapshotInfo
from sandvm.server.store import PoolRecord
from sandvm.server.tenancy import Tenancy, every, sandbox_info
from sandvm.snapshots.store import Snapshot, SnapshotStore

log = logging.getLogger("sandvm.server")

RESTORE_CONCURRENCY = 2  # pool restores at once, over all pools (one per core here)
REFRESH_INTERVAL = 600.0  # seconds between renewals of waiting sandboxes' TTLs


def _check_name(name: str, what: str) -> str:
    try:
        return validate_vm_id(name)
    except InvalidSpec:
        raise InvalidSpec(f"invalid {what} name {name[:80]!r}: use 1-63 letters, digits,"
                          " '.', '_' or '-', starting with a letter or digit") from None


class Library:
    """The snapshots and pools of every tenant, for one SandboxService: ownership,
    quotas and held sandboxes through its ``Tenancy``, kept pools in its store."""

    def __init__(self, tenancy: Tenancy) -> None:
        self.tenancy = tenancy
        self.config = tenancy.config
        self.records = tenancy.store  # the server's store: kept pools and their members
        self.manager = tenancy.manager
        self.metrics = tenancy.metrics
        self.root = self.config.state_dir / "snapshots"
        self._pools: dict[tuple[str, str], AsyncPool] = {}
        self._broken: dict[tuple[str, str], str] = {}  # kept pools that did not start
        self._snap_locks: dict[str, asyncio.Lock] = {}  # per tenant: quota check + save
        self._refresher: asyncio.Task[None] | None = None
        self._pool_lock = asyncio.Lock()
        # pools refill in the background: a few restores at a time, so that a burst of
        # takes does not starve the sandboxes already running of CPU
        self._restore_slots = asyncio.Semaphore(RESTORE_CONCURRENCY)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Kill the waiting sandboxes a stopped server left, remove what its cut-off
        snapshot saves left, start the kept pools again (one that cannot start stays
        listed, with why)."""
        leftovers = self.records.pool_members()

        async def kill(sid: str) -> None:
            with contextlib.suppress(SandvmError):
                await self.manager.kill(sid, reason="a waiting pool sandbox of a stopped"
                                                        " server")

        await asyncio.gather(*(kill(sid) for sid in leftovers))
        if self.root.is_dir():  # what saves and deletions a dead server cut off left
            for d in self.root.iterdir():
                if d.is_dir():
                    SnapshotStore(d).clean_staging(older_than=60.0)
        self.records.forget_pool_members()
        for p in self.records.pools():
            tenant, name = p.tenant, p.name
            try:
                await self._start_pool(tenant, name, p.snapshot, min_size=p.min_size,
                                       max_size=p.max_size, idle_timeout=p.idle_timeout,
                                       network=NetworkPolicy(**p.network) if p.network
                                       else None)
            except Exception as exc:  # noqa: BLE001 - the pool stays listed, with why
                why = getattr(exc, "code", type(exc).__name__)
                self._broken[(tenant, name)] = f"{why}: it did not start again after a" \
                                               " restart (details in the server's log)"
                log.warning("pool %s of tenant %s not started again: %s", name, tenant,
                            getattr(exc, "message", exc))
        self._refresher = asyncio.get_running_loop().create_task(every(
            REFRESH_INTERVAL, self.refresh_members, "renewing waiting pool sandboxes"))

    async def stop(self) -> None:
        """Close every pool (their waiting sandboxes are killed; the pools stay kept)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
        self.records.forget_pool_members()

    # ------------------------------------------------------------------ snapshots

    def store(self, tenant: str) -> SnapshotStore:
        """The tenant's own snapshot store (its name was checked when its key was made),
        capped at the server's ``max_snapshot_bytes``."""
        return SnapshotStore(self.root / tenant,
                             max_bytes=self.config.max_snapshot_bytes)

    def _snapshot(self, tenant: str, name: str) -> Snapshot:
        """Raises SnapshotNotFound (also for another tenant's), SnapshotCorrupt."""
        _check_name(name, "snapshot")
        try:
            return self.store(tenant).get(name)
        except SnapshotNotFound:
            raise SnapshotNotFound(f"no snapshot named {name!r}") from None
        except (SnapshotCorrupt, SnapshotIncompatible) as exc:  # their messages name paths
            log.warning("tenant %s: %s", tenant, exc.message)
            what = "is damaged" if isinstance(exc, SnapshotCorrupt) else \
                "was made by another version of sandvm or QEMU"
            raise type(exc)(f"snapshot {name!r} {what}: delete it and take it"
                            " again") from None

    @staticmethod
    def _snap_info(snap: Snapshot) -> SnapshotInfo:
        return SnapshotInfo(name=snap.name, created=snap.created, source_id=snap.source_id,
                            image=snap.spec.image, memory_mib=snap.spec.memory_mib,
                            vcpus=snap.spec.vcpus, size_bytes=snap.size_bytes)

    async def snapshot(self, tenant: str, sandbox_id: str, name: str | None) -> SnapshotInfo:
        """Save the running sandbox as the tenant's snapshot ``name`` (default: a new
        id); the sandbox goes on running. Raises InvalidSpec, SnapshotAlreadyExists,
        QuotaExceeded (``max_snapshots``, or ``max_snapshot_bytes``: then nothing of
        the save is left), VmNotFound, SandboxStateError."""
        name = _check_name(name, "snapshot") if name is not None else new_id("snap")
        self.tenancy.record(tenant, sandbox_id)
        store = self.store(tenant)
        byte_cap = store.max_bytes
        # one save at a time per tenant: the count and the bytes are checked with none
        # in flight (the store measures the bytes again, with the new snapshot, under
        # its own lock before it keeps it)
        async with self._snap_locks.setdefault(tenant, asyncio.Lock()):
            self.tenancy.check_snapshot_count(tenant, len(store.list()))
            if byte_cap is not None:
                used = await asyncio.to_thread(store.bytes_used)
                self.tenancy.check_snapshot_bytes(tenant, used, byte_cap)
            if store.exists(name):
                raise SnapshotAlreadyExists("", name)
            sb = await self.tenancy.hold(sandbox_id)
            try:
                snap = await sb.snapshot(name, store=store)
            except SnapshotAlreadyExists:
                raise SnapshotAlreadyExists("", name) from None
            except QuotaExceeded as exc:  # the store's byte cap; its message names paths
                raise self.tenancy.snapshot_too_big(tenant, name, exc, byte_cap) from None
            except SandvmError as exc:
                raise await self.tenancy.explain(sandbox_id, exc) from exc
        return self._snap_info(snap)

    def list_snapshots(self, tenant: str) -> list[SnapshotInfo]:
        """The tenant's snapshots, by name (damaged ones are left out)."""
        return [self._snap_info(s) for s in self.store(tenant).list()]

    def get_snapshot(self, tenant: str, name: str) -> SnapshotInfo:
        return self._snap_info(self._snapshot(tenant, name))

    def delete_snapshot(self, tenant: str, name: str) -> None:
        """Remove the snapshot; sandboxes restored from it keep running. Raises
        SnapshotNotFound, SnapshotInUse (a pool restores from it)."""
        _check_name(name, "snapshot")
        users = self.records.pools_using(tenant, name)
        if users:
            raise SnapshotInUse(f"snapshot {name!r} is used by pool {users[0]!r}: delete the"
                                " pool first (DELETE /v1/pools/NAME)")
        store = self.store(tenant)
        try:
            store.remove(name)
        except SnapshotNotFound:  # its message names the store's path
            raise SnapshotNotFound(f"no snapshot named {name!r}") from None

    # ------------------------------------------------------------------ sandboxes

    async def from_snapshot(self, tenant: str, name: str, *, ttl: float | None,
                            network: NetworkPolicy | None) -> SandboxInfo:
        """A new sandbox of the tenant restored from its snapshot ``name``. Raises
        SnapshotNotFound, QuotaExceeded, InvalidSpec, VmBootError."""
        snap = self._snapshot(tenant, name)

        async def make(sid: str, ttl: float) -> AsyncSandbox:
            return await self.manager.from_snapshot(snap, ttl=ttl, sandbox_id=sid,
                                                    network=network)

        return await self.tenancy.new_owned(tenant, memory_mib=snap.spec.memory_mib, ttl=ttl,
                                            make=make)

    async def fork(self, tenant: str, sandbox_id: str, n: int, *,
                   ttl: float | None) -> list[SandboxInfo]:
        """``n`` new sandboxes of the tenant, copies of its running sandbox (with its
        network policy). Raises QuotaExceeded, InvalidSpec, VmNotFound,
        SandboxStateError."""
        if not 1 <= n <= self.config.max_fork:
            raise InvalidSpec(f"fork makes 1 to {self.config.max_fork} copies on this"
                              f" server, not {n}")
        rec = self.tenancy.record(tenant, sandbox_id)
        memory = int((rec.record.get("spec") or {}).get("memory_mib", 0))
        sb = await self.tenancy.hold(sandbox_id)
        ttl = self.tenancy.check_ttl(ttl)
        await self.tenancy.reap()  # sandboxes that ended free their quota first
        ids = [new_id("sb") for _ in range(n)]
        self.tenancy.reserve_all(ids, tenant, memory_mib=memory)  # every copy's: all or none
        with self.tenancy.creating(ids):
            try:
                try:
                    copies = await self.manager.fork(sb, n, ttl=ttl, sandbox_ids=ids)
                except SandvmError as exc:
                    raise await self.tenancy.explain(sandbox_id, exc) from exc
            except BaseException:
                for sid in ids:
                    self.tenancy.release(sid)
                raise
        infos = []
        for c in copies:
            self.tenancy.adopt(c.sandbox_id, c)
            self.metrics.sandboxes_created.inc(outcome="fork")
            copy = self.manager.journal.get(c.sandbox_id)
            if copy is not None:  # listed even if it ended at once: the caller owns it
                infos.append(sandbox_info(copy))
        return infos

    # ------------------------------------------------------------------ pools

    def _row(self, tenant: str, name: str) -> PoolRecord:
        """The kept pool. Raises PoolNotFound."""
        _check_name(name, "pool")
        row = self.records.pool(tenant, name)
        if row is None:
            raise PoolNotFound(f"no pool named {name!r}")
        return row

    def _running(self, tenant: str, name: str) -> AsyncPool:
        """The kept pool ``name`` (its row read already), running. Raises PoolError
        (kept but not running)."""
        pool = self._pools.get((tenant, name))
        if pool is None:
            why = self._broken.get((tenant, name), "starting")
            raise PoolError(f"pool {name!r} is not running ({why}): delete it and create it"
                            " again")
        return pool

    def pool_memory_mib(self, tenant: str) -> int:
        """Memory the tenant's pools may hold: each pool's ``max_size`` times its
        sandboxes' memory (counted in the tenant's memory quota)."""
        return self.records.pool_memory_mib(tenant)

    async def _restore_member(self, tenant: str, pool: str, snap: Snapshot,
                              network: NetworkPolicy | None) -> AsyncSandbox:
        sid = new_id("sb")
        self.records.add_pool_member(sid, tenant, pool)
        try:
            async with self._restore_slots:
                return await self.manager.from_snapshot(
                    snap, ttl=self.config.max_ttl, sandbox_id=sid, network=network)
        except BaseException as exc:
            self._forget_member(sid)
            if isinstance(exc, Exception):
                log.warning("pool %s of tenant %s: a restore failed: %s", pool, tenant,
                            getattr(exc, "message", exc))
            raise

    def _forget_member(self, sid: str) -> None:
        self.records.forget_pool_members(sandbox_id=sid)

    async def refresh_members(self) -> None:
        """Keep waiting sandboxes alive: one whose deadline is less than half the
        server's max TTL away gets the whole of it again (they wait for days, maybe)."""
        horizon = time.time() + self.config.max_ttl / 2
        for pool in list(self._pools.values()):
            for sb in pool.waiting():
                rec = self.manager.journal.get(sb.sandbox_id)
                if rec is not None and rec.deadline is not None and rec.deadline < horizon:
                    with contextlib.suppress(SandvmError):
                        self.manager.set_ttl(sb.sandbox_id, self.config.max_ttl)

    async def _start_pool(self, tenant: str, name: str, snapshot: str, *, min_size: int,
                          max_size: int, idle_timeout: float | None,
                          network: NetworkPolicy | None) -> AsyncPool:
        snap = self._snapshot(tenant, snapshot)

        async def restore(s: Snapshot) -> AsyncSandbox:
            return await self._restore_member(tenant, name, s, network)

        pool = AsyncPool(snapshot=snap, min_size=min_size, max_size=max_size,
                         idle_timeout=idle_timeout, network=network, restore=restore)
        await pool.start()
        self._pools[(tenant, name)] = pool
        self._broken.pop((tenant, name), None)
        return pool

    async def create_pool(self, tenant: str, name: str, *, snapshot: str, min_size: int,
                          max_size: int, idle_timeout: float | None,
                          network: NetworkPolicy | None) -> PoolInfo:
        """Start a pool restoring the tenant's ``snapshot``, kept across restarts.
        Raises PoolExists, SnapshotNotFound, QuotaExceeded (``max_pools``,
        ``max_pool_size`` over the tenant's pools, or its memory), InvalidSpec,
        Unsupported (a server whose provider cannot restore snapshots)."""
        _check_name(name, "pool")
        if not 0 <= min_size <= max_size or max_size < 1:
            raise InvalidSpec(f"need 0 <= min_size <= max_size and max_size >= 1, got"
                              f" {min_size}, {max_size}")
        snap = self._snapshot(tenant, snapshot)
        if self.tenancy.manager.provider is not None:
            raise Unsupported("pools restore snapshots, which needs the QEMU provider; this"
                              " server runs sandboxes on"
                              f" {type(self.tenancy.manager.provider).__name__}")
        exists = PoolExists(f"a pool named {name!r} exists: delete it first or choose"
                            " another name")
        async with self._pool_lock:  # the checks and the insert, one at a time
            if self.records.pool(tenant, name) is not None:
                raise exists
            self.tenancy.check_pools(tenant, max_size=max_size,
                                     memory_mib=snap.spec.memory_mib)
            if not self.records.add_pool(PoolRecord(
                    tenant=tenant, name=name, snapshot=snapshot, min_size=min_size,
                    max_size=max_size, idle_timeout=idle_timeout,
                    network=network.to_dict() if network else None,
                    memory_mib=snap.spec.memory_mib, created=time.time())):
                raise exists  # another server process on the same state dir made it
        try:  # outside the lock: its first verify reads the whole snapshot
            await self._start_pool(tenant, name, snapshot, min_size=min_size,
                                   max_size=max_size, idle_timeout=idle_timeout,
                                   network=network)
        except BaseException:
            self.records.remove_pool(tenant, name)
            raise
        return self.pool_info(tenant, name)

    def pool_info(self, tenant: str, name: str) -> PoolInfo:
        """Settings and counters of a kept pool (one that did not start again after a
        restart shows zeros and why in ``last_error``). Raises PoolNotFound."""
        row = self._row(tenant, name)
        pool = self._pools.get((tenant, name))
        common: dict[str, Any] = {
            "name": name, "snapshot": row.snapshot, "min_size": row.min_size,
            "max_size": row.max_size, "idle_timeout": row.idle_timeout,
            "network": row.network is not None, "created": row.created}
        if pool is None:
            return PoolInfo(**common, ready=0, restoring=0, hits=0, misses=0, timeouts=0,
                            restored=0, restore_failures=0, restore_ms_p50=None,
                            restore_ms_p99=None,
                            last_error=self._broken.get((tenant, name), "starting"))
        st = pool.stats()
        # the code only: messages name server paths (the server's log has them)
        err = pool.last_error
        return PoolInfo(**common, ready=st.ready, restoring=st.in_flight, hits=st.hits,
                        misses=st.misses, timeouts=st.timeouts, restored=st.restored,
                        restore_failures=st.restore_failures,
                        restore_ms_p50=st.restore_ms_p50, restore_ms_p99=st.restore_ms_p99,
                        last_error=None if err is None
                        else f"{err.code}: a restore failed (details in the server's log)")

    def list_pools(self, tenant: str) -> list[PoolInfo]:
        return [self.pool_info(tenant, p.name) for p in self.records.pools(tenant)]

    async def delete_pool(self, tenant: str, name: str) -> None:
        """Stop the pool and kill its waiting sandboxes (the ones it handed out are the
        tenant's and go on). Raises PoolNotFound."""
        async with self._pool_lock:
            self._row(tenant, name)
            pool = self._pools.pop((tenant, name), None)
            self._broken.pop((tenant, name), None)
            self.records.remove_pool(tenant, name)
            if pool is not None:
                await pool.close()
            self.records.forget_pool_members(tenant=tenant, pool=name)

    async def from_pool(self, tenant: str, name: str, *, ttl: float | None,
                        wait: float | None = None) -> SandboxInfo:
        """Take a waiting sandbox from the tenant's pool (restoring one if none waits,
        up to ``wait`` seconds, at most the server's ``pool_acquire_timeout``): it
        becomes the tenant's, alive ``ttl`` seconds. Raises PoolNotFound, PoolExhausted
        (none became ready: 503), PoolClosed, QuotaExceeded."""
        mem = self._row(tenant, name).memory_mib
        pool = self._running(tenant, name)
        ttl = self.tenancy.check_ttl(ttl)
        cap = self.config.pool_acquire_timeout
        wait = cap if wait is None else min(wait, cap)
        await self.tenancy.reap()
        placeholder = new_id("sb")  # the quota is taken before waiting for the pool
        self.tenancy.reserve(placeholder, tenant, memory_mib=mem)
        with self.tenancy.creating([placeholder]):  # not reaped while it waits
            try:
                sb = await pool.acquire(timeout=wait)
            except BaseException as exc:
                self.tenancy.release(placeholder)  # the quota is free again at once
                if isinstance(exc, PoolExhausted):  # its message names server paths
                    raise PoolExhausted(f"pool {name!r} had no sandbox ready within"
                                        f" {wait:g} s: retry, or raise its min_size"
                                        ) from None
                raise
            pool.disown(sb)
            sid = sb.sandbox_id
            try:
                if not self.records.hand_out(placeholder, sid):  # the tenant's now: one step
                    raise SandvmError(f"the reservation for sandbox {sid} was lost")
                self.manager.set_ttl(sid, ttl)
            except BaseException:
                self.tenancy.release(placeholder)
                self.tenancy.release(sid)
                self._forget_member(sid)
                with contextlib.suppress(SandvmError):
                    await self.manager.kill(sid, reason="killed: handing it out failed")
                with contextlib.suppress(SandvmError):
                    await sb.kill()
                raise
        self.tenancy.adopt(sid, sb)
        self.metrics.sandboxes_created.inc(outcome="pool")
        return self.tenancy.info(tenant, sid)
