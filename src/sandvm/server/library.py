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
import json
import logging
import time
from typing import TYPE_CHECKING

from sandvm.core import new_id, validate_vm_id
from sandvm.egress import NetworkPolicy
from sandvm.errors import (
    InvalidSpec,
    PoolExists,
    PoolNotFound,
    QuotaExceeded,
    SandvmError,
    SnapshotInUse,
    SnapshotNotFound,
)
from sandvm.pools.pool import AsyncPool
from sandvm.runtime.journal import transaction
from sandvm.sandbox import AsyncSandbox
from sandvm.server.models import PoolInfo, SandboxInfo, SnapshotInfo
from sandvm.snapshots.store import Snapshot, SnapshotStore

if TYPE_CHECKING:
    from sandvm.server.service import SandboxService

log = logging.getLogger("sandvm.server")

SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    min_size INTEGER NOT NULL,
    max_size INTEGER NOT NULL,
    idle_timeout REAL,
    network TEXT,                     -- the policy as JSON, or NULL
    memory_mib INTEGER NOT NULL,      -- of each sandbox (the snapshot's)
    created REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS pool_members (
    id TEXT PRIMARY KEY,              -- a waiting sandbox: nobody's yet
    tenant TEXT NOT NULL,
    pool TEXT NOT NULL
);
"""


RESTORE_CONCURRENCY = 2  # pool restores at once, over all pools (one per core here)


def _check_name(name: str, what: str) -> str:
    try:
        return validate_vm_id(name)
    except InvalidSpec:
        raise InvalidSpec(f"invalid {what} name {name[:80]!r}: use 1-63 letters, digits,"
                          " '.', '_' or '-', starting with a letter or digit") from None


class Library:
    """The snapshots and pools of every tenant, for one SandboxService."""

    def __init__(self, service: SandboxService) -> None:
        self.svc = service
        self.root = service.config.state_dir / "snapshots"
        self._db = service.store._db
        self._db.executescript(SCHEMA)
        self._pools: dict[tuple[str, str], AsyncPool] = {}
        self._pool_lock = asyncio.Lock()
        # pools refill in the background: a few restores at a time, so that a burst of
        # takes does not starve the sandboxes already running of CPU
        self._restore_slots = asyncio.Semaphore(RESTORE_CONCURRENCY)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Kill the waiting sandboxes a stopped server left, start the kept pools again
        (a pool whose snapshot is gone is logged and skipped)."""
        leftovers = [r[0] for r in self._db.execute("SELECT id FROM pool_members")]
        for sid in leftovers:
            with contextlib.suppress(SandvmError):
                await self.svc.manager.kill(sid, reason="a waiting pool sandbox of a stopped"
                                                        " server")
        with transaction(self._db) as db:
            db.execute("DELETE FROM pool_members")
        rows = self._db.execute("SELECT tenant, name, snapshot, min_size, max_size,"
                                " idle_timeout, network FROM pools").fetchall()
        for tenant, name, snap, lo, hi, idle, net in rows:
            try:
                await self._start_pool(tenant, name, snap, min_size=lo, max_size=hi,
                                       idle_timeout=idle,
                                       network=NetworkPolicy(**json.loads(net)) if net else None)
            except SandvmError as exc:
                log.warning("pool %s of tenant %s not started again: %s", name, tenant,
                            exc.message)

    async def stop(self) -> None:
        """Close every pool (their waiting sandboxes are killed; the pools stay kept)."""
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
        with transaction(self._db) as db:
            db.execute("DELETE FROM pool_members")

    # ------------------------------------------------------------------ snapshots

    def store(self, tenant: str) -> SnapshotStore:
        """The tenant's own snapshot store (its name was checked when its key was made)."""
        return SnapshotStore(self.root / tenant)

    def _snapshot(self, tenant: str, name: str) -> Snapshot:
        """Raises SnapshotNotFound (also for another tenant's), SnapshotCorrupt."""
        _check_name(name, "snapshot")
        try:
            return self.store(tenant).get(name)
        except SnapshotNotFound:
            raise SnapshotNotFound(f"no snapshot named {name!r}") from None

    @staticmethod
    def _snap_info(snap: Snapshot) -> SnapshotInfo:
        return SnapshotInfo(name=snap.name, created=snap.created, source_id=snap.source_id,
                            image=snap.spec.image, memory_mib=snap.spec.memory_mib,
                            vcpus=snap.spec.vcpus, size_bytes=snap.size_bytes)

    async def snapshot(self, tenant: str, sandbox_id: str, name: str | None) -> SnapshotInfo:
        """Save the running sandbox as the tenant's snapshot ``name`` (default: a new
        id); the sandbox goes on running. Raises InvalidSpec, SnapshotAlreadyExists,
        QuotaExceeded (``max_snapshots``), VmNotFound, SandboxStateError."""
        name = _check_name(name, "snapshot") if name is not None else new_id("snap")
        self.svc._record(tenant, sandbox_id)
        store = self.store(tenant)
        cap = self.svc.config.max_snapshots
        if len(store.list()) >= cap:
            raise QuotaExceeded(f"tenant {tenant!r} has {cap} snapshots, its quota: delete"
                                " one (DELETE /v1/snapshots/NAME)")
        sb = await self.svc._hold(sandbox_id)
        try:
            snap = await sb.snapshot(name, store=store)
        except SandvmError as exc:
            raise await self.svc._ended_instead(sandbox_id, exc) from exc
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
        users = [r[0] for r in self._db.execute(
            "SELECT name FROM pools WHERE tenant = ? AND snapshot = ?", (tenant, name))]
        if users:
            raise SnapshotInUse(f"snapshot {name!r} is used by pool {users[0]!r}: delete the"
                                " pool first (DELETE /v1/pools/NAME)")
        store = self.store(tenant)
        if not store.exists(name):
            raise SnapshotNotFound(f"no snapshot named {name!r}")
        store.remove(name)

    # ------------------------------------------------------------------ sandboxes

    async def from_snapshot(self, tenant: str, name: str, *, ttl: float | None,
                            network: NetworkPolicy | None) -> SandboxInfo:
        """A new sandbox of the tenant restored from its snapshot ``name``. Raises
        SnapshotNotFound, QuotaExceeded, InvalidSpec, VmBootError."""
        snap = self._snapshot(tenant, name)

        async def make(sid: str, ttl: float) -> AsyncSandbox:
            return await self.svc.manager.from_snapshot(snap, ttl=ttl, sandbox_id=sid,
                                                        network=network)

        return await self.svc._new_owned(tenant, memory_mib=snap.spec.memory_mib, ttl=ttl,
                                         make=make)

    async def fork(self, tenant: str, sandbox_id: str, n: int, *,
                   ttl: float | None) -> list[SandboxInfo]:
        """``n`` new sandboxes of the tenant, copies of its running sandbox (with its
        network policy). Raises QuotaExceeded, InvalidSpec, VmNotFound,
        SandboxStateError."""
        if not 1 <= n <= self.svc.config.max_fork:
            raise InvalidSpec(f"fork makes 1 to {self.svc.config.max_fork} copies on this"
                              f" server, not {n}")
        rec = self.svc._record(tenant, sandbox_id)
        memory = int((rec.record.get("spec") or {}).get("memory_mib", 0))
        sb = await self.svc._hold(sandbox_id)
        ttl = self.svc._check_ttl(ttl)
        ids = [new_id("sb") for _ in range(n)]
        for i, sid in enumerate(ids):  # every copy's quota first: all or none
            try:
                self.svc._reserve(sid, tenant, memory_mib=memory)
            except BaseException:
                for done in ids[:i]:
                    self.svc.store.mark_ended(done)
                raise
        self.svc._creating.update(ids)
        try:
            try:
                copies = await self.svc.manager.fork(sb, n, ttl=ttl, sandbox_ids=ids)
            except SandvmError as exc:
                raise await self.svc._ended_instead(sandbox_id, exc) from exc
        except BaseException:
            for sid in ids:
                self.svc.store.mark_ended(sid)
            raise
        finally:
            self.svc._creating.difference_update(ids)
        for c in copies:
            self.svc._held[c.sandbox_id] = c
        return [self.svc.get(tenant, c.sandbox_id) for c in copies]

    # ------------------------------------------------------------------ pools

    def _pool(self, tenant: str, name: str) -> AsyncPool:
        _check_name(name, "pool")
        pool = self._pools.get((tenant, name))
        if pool is None:
            raise PoolNotFound(f"no pool named {name!r}")
        return pool

    def pool_memory_mib(self, tenant: str) -> int:
        """Memory the tenant's pools may hold: each pool's ``max_size`` times its
        sandboxes' memory (counted in the tenant's memory quota)."""
        (n,) = self._db.execute("SELECT coalesce(sum(max_size * memory_mib), 0) FROM pools"
                                " WHERE tenant = ?", (tenant,)).fetchone()
        return int(n)

    async def _restore_member(self, tenant: str, pool: str, snap: Snapshot,
                              network: NetworkPolicy | None) -> AsyncSandbox:
        sid = new_id("sb")
        with transaction(self._db) as db:
            db.execute("INSERT INTO pool_members (id, tenant, pool) VALUES (?, ?, ?)",
                       (sid, tenant, pool))
        try:
            async with self._restore_slots:
                return await self.svc.manager.from_snapshot(
                    snap, ttl=self.svc.config.max_ttl, sandbox_id=sid, network=network)
        except BaseException:
            self._forget_member(sid)
            raise

    def _forget_member(self, sid: str) -> None:
        with transaction(self._db) as db:
            db.execute("DELETE FROM pool_members WHERE id = ?", (sid,))

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
        return pool

    async def create_pool(self, tenant: str, name: str, *, snapshot: str, min_size: int,
                          max_size: int, idle_timeout: float | None,
                          network: NetworkPolicy | None) -> PoolInfo:
        """Start a pool restoring the tenant's ``snapshot``, kept across restarts.
        Raises PoolExists, SnapshotNotFound, QuotaExceeded (``max_pools``,
        ``max_pool_size`` or the tenant's memory), InvalidSpec."""
        cfg = self.svc.config
        _check_name(name, "pool")
        if not 0 <= min_size <= max_size or not 1 <= max_size <= cfg.max_pool_size:
            raise InvalidSpec(f"need 0 <= min_size <= max_size and 1 <= max_size <="
                              f" {cfg.max_pool_size} (this server's cap), got {min_size},"
                              f" {max_size}")
        snap = self._snapshot(tenant, snapshot)
        async with self._pool_lock:  # the checks and the insert, one pool at a time
            if (tenant, name) in self._pools:
                raise PoolExists(f"a pool named {name!r} exists: delete it first or choose"
                                 " another name")
            mine = sum(1 for t, _ in self._pools if t == tenant)
            if mine >= cfg.max_pools:
                raise QuotaExceeded(f"tenant {tenant!r} has {mine} pools, its quota: delete"
                                    " one (DELETE /v1/pools/NAME)")
            self.svc._check_memory(tenant, max_size * snap.spec.memory_mib,
                                   what=f"a pool of up to {max_size} sandboxes of"
                                        f" {snap.spec.memory_mib} MiB")
            with transaction(self._db) as db:
                db.execute("INSERT OR REPLACE INTO pools (tenant, name, snapshot, min_size,"
                           " max_size, idle_timeout, network, memory_mib, created) VALUES"
                           " (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (tenant, name, snapshot, min_size, max_size, idle_timeout,
                            json.dumps(network.to_dict()) if network else None,
                            snap.spec.memory_mib, time.time()))
            try:
                await self._start_pool(tenant, name, snapshot, min_size=min_size,
                                       max_size=max_size, idle_timeout=idle_timeout,
                                       network=network)
            except BaseException:
                with transaction(self._db) as db:
                    db.execute("DELETE FROM pools WHERE tenant = ? AND name = ?",
                               (tenant, name))
                raise
        return self.pool_info(tenant, name)

    def pool_info(self, tenant: str, name: str) -> PoolInfo:
        """Raises PoolNotFound."""
        pool = self._pool(tenant, name)
        row = self._db.execute("SELECT snapshot, created FROM pools WHERE tenant = ? AND"
                               " name = ?", (tenant, name)).fetchone()
        if row is None:
            raise PoolNotFound(f"no pool named {name!r}")
        st = pool.stats()
        return PoolInfo(name=name, snapshot=row[0], min_size=pool.min_size,
                        max_size=pool.max_size, idle_timeout=pool.idle_timeout,
                        network=pool.network is not None, created=row[1], ready=st.ready,
                        restoring=st.in_flight, hits=st.hits, misses=st.misses,
                        timeouts=st.timeouts, restored=st.restored,
                        restore_failures=st.restore_failures,
                        restore_ms_p50=st.restore_ms_p50, restore_ms_p99=st.restore_ms_p99,
                        last_error=st.last_error)

    def list_pools(self, tenant: str) -> list[PoolInfo]:
        return [self.pool_info(t, n) for t, n in sorted(self._pools) if t == tenant]

    async def delete_pool(self, tenant: str, name: str) -> None:
        """Stop the pool and kill its waiting sandboxes (the ones it handed out are the
        tenant's and go on). Raises PoolNotFound."""
        pool = self._pool(tenant, name)
        self._pools.pop((tenant, name), None)
        with transaction(self._db) as db:
            db.execute("DELETE FROM pools WHERE tenant = ? AND name = ?", (tenant, name))
        await pool.close()
        with transaction(self._db) as db:
            db.execute("DELETE FROM pool_members WHERE tenant = ? AND pool = ?",
                       (tenant, name))

    async def from_pool(self, tenant: str, name: str, *, ttl: float | None) -> SandboxInfo:
        """Take a waiting sandbox from the tenant's pool (restoring one if none waits,
        up to ``pool_acquire_timeout`` seconds): it becomes the tenant's, alive ``ttl``
        seconds. Raises PoolNotFound, PoolExhausted (none became ready: 503),
        PoolClosed, QuotaExceeded."""
        pool = self._pool(tenant, name)
        mem = int(self._db.execute("SELECT memory_mib FROM pools WHERE tenant = ? AND"
                                   " name = ?", (tenant, name)).fetchone()[0])
        ttl = self.svc._check_ttl(ttl)
        placeholder = new_id("sb")  # the quota is taken before waiting for the pool
        self.svc._reserve(placeholder, tenant, memory_mib=mem)
        try:
            sb = await pool.acquire(timeout=self.svc.config.pool_acquire_timeout)
        except BaseException:
            self.svc.store.mark_ended(placeholder)
            raise
        pool.disown(sb)
        sid = sb.sandbox_id
        try:
            self.svc.store.rename_reserved(placeholder, sid)
            self._forget_member(sid)
            self.svc.manager.set_ttl(sid, ttl)
        except BaseException:
            self.svc.store.mark_ended(placeholder)
            self.svc.store.mark_ended(sid)
            with contextlib.suppress(SandvmError):
                await sb.kill()
            raise
        self.svc._held[sid] = sb
        self.svc.metrics.sandboxes_created.inc(outcome="pool")
        return self.svc.get(tenant, sid)
