"""The server's Tenancy component through its public interface: ownership, quotas,
held sandboxes and error explanations, decided without a VM (a real store and
journal in a temporary directory; a "running" sandbox is a journal record whose keeper
is this test process)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from sandvm._files import proc_start_time
from sandvm.errors import (
    AgentDisconnected,
    GuestFileNotFound,
    InvalidSpec,
    QuotaExceeded,
    SandboxStateError,
    VmNotFound,
)
from sandvm.runtime.journal import Journal
from sandvm.runtime.manager import SandboxManager
from sandvm.sandbox import AsyncSandbox
from sandvm.server.config import ServerConfig
from sandvm.server.metrics import Metrics
from sandvm.server.store import PoolRecord, ServerStore
from sandvm.server.tenancy import Tenancy, not_found, sandbox_info


class World:
    """A Tenancy on a fresh state dir and journal."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.config = ServerConfig(state_dir=tmp / "state", **config)
        self.store = ServerStore(self.config.state_dir)
        self.journal = Journal(tmp / "journal.db")
        self.metrics = Metrics(live_sandboxes=lambda: 0.0, exposed_ports=lambda: 0.0)
        self.tenancy = Tenancy(self.config, store=self.store,
                               manager=SandboxManager(self.journal), metrics=self.metrics)

    def running(self, sid: str, *, memory_mib: int = 256) -> None:
        """Journal ``sid`` as running under a live keeper (this process)."""
        self.journal.add(sid, state="running", keeper_pid=os.getpid(),
                         keeper_start=proc_start_time(os.getpid()),
                         record={"spec": {"image": "base", "memory_mib": memory_mib,
                                          "vcpus": 1}})

    def owned(self, sid: str, tenant: str, *, memory_mib: int = 256) -> None:
        """``sid`` is ``tenant``'s and running."""
        self.tenancy.reserve(sid, tenant, memory_mib=memory_mib)
        self.running(sid, memory_mib=memory_mib)

    def rejections(self) -> float:
        return self.metrics.quota_rejections.value()

    def close(self) -> None:
        self.store.close()
        self.journal.close()


@pytest.fixture
def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    yield w
    w.close()


def make_world(tmp_path: Path, **config: Any) -> World:
    return World(tmp_path, **config)


class FakeSandbox:
    """Stands for a held AsyncSandbox: only what Tenancy touches."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.killed = False

    async def is_running(self) -> bool:
        return not self.killed

    async def kill(self) -> None:
        self.killed = True


def held(sb: FakeSandbox) -> AsyncSandbox:
    return sb  # type: ignore[return-value]


# ---------------------------------------------------------------------------- ownership


def test_a_sandbox_is_its_owners_only(world: World) -> None:
    t = world.tenancy
    world.owned("sb-a1", "alice")
    rec = t.record("alice", "sb-a1")
    assert rec.id == "sb-a1"
    info = t.info("alice", "sb-a1")
    assert (info.sandbox_id, info.state, info.memory_mib) == ("sb-a1", "running", 256)
    assert [i.sandbox_id for i in t.live("alice")] == ["sb-a1"] and t.live("bob") == []
    for tenant, sid in (("bob", "sb-a1"), ("alice", "sb-none"), ("alice", "../x" * 40)):
        with pytest.raises(VmNotFound) as ei:  # another tenant's is the same as none
            t.record(tenant, sid)
        assert ei.value.message == f"no sandbox {sid[:80]!r}"
    assert not_found("sb-x").message == "no sandbox 'sb-x'"


def test_an_ended_sandbox_is_a_state_error_and_frees_its_quota(world: World) -> None:
    t = world.tenancy
    world.owned("sb-a1", "alice")
    world.journal.end("sb-a1", "ttl")
    with pytest.raises(SandboxStateError, match=r"sb-a1 has ended \(ttl\)"):
        t.record("alice", "sb-a1")
    assert world.store.owner("sb-a1") is not None
    assert world.store.owned("alice") == []  # marked ended on the way
    with pytest.raises(SandboxStateError, match=r"sb-a1 has ended$"):
        t.record("alice", "sb-a1")


def test_a_sandbox_being_created_is_starting_and_never_reaped(world: World) -> None:
    t = world.tenancy
    t.reserve("sb-new", "alice", memory_mib=256)
    world.journal.add("sb-new", state="starting")  # no keeper yet
    with t.creating(["sb-new"]):
        with pytest.raises(SandboxStateError, match="still starting"):
            t.record("alice", "sb-new")
        assert asyncio.run(t.reap()) == []
    assert world.store.owned("alice") == ["sb-new"]  # starting elsewhere: left alone
    assert asyncio.run(t.reap()) == []
    world.journal.end("sb-new", "failed")
    assert asyncio.run(t.reap()) == ["sb-new"] and world.store.owned("alice") == []


def test_reap_lets_go_of_ended_sandboxes(world: World) -> None:
    t = world.tenancy
    dropped: list[str] = []

    async def hook(sid: str) -> None:
        dropped.append(sid)

    t.on_drop(hook)
    world.owned("sb-a1", "alice")
    world.owned("sb-a2", "alice")
    sb = FakeSandbox("sb-a1")
    t.adopt("sb-a1", held(sb))
    assert t.holding("sb-a1") is sb
    world.journal.end("sb-a1", "killed")
    assert asyncio.run(t.reap()) == ["sb-a1"]
    assert dropped == ["sb-a1"] and sb.killed and t.holding("sb-a1") is None
    assert world.store.owned("alice") == ["sb-a2"]


def test_hold_returns_the_held_handle_while_it_runs(world: World) -> None:
    t = world.tenancy
    world.owned("sb-a1", "alice")
    sb = FakeSandbox("sb-a1")
    t.adopt("sb-a1", held(sb))

    async def go() -> None:
        assert await t.held("alice", "sb-a1") is sb
        with pytest.raises(VmNotFound):
            await t.held("bob", "sb-a1")

    asyncio.run(go())


# ---------------------------------------------------------------------------- quotas


def test_live_sandbox_quota(tmp_path: Path) -> None:
    w = make_world(tmp_path, max_sandboxes=2)
    t = w.tenancy
    t.reserve("sb-1", "alice", memory_mib=256)
    t.reserve("sb-2", "alice", memory_mib=256)
    t.reserve("sb-3", "bob", memory_mib=256)  # per tenant
    with pytest.raises(QuotaExceeded, match="already has 2 live sandboxes"):
        t.reserve("sb-4", "alice", memory_mib=256)
    assert w.rejections() == 1 and w.store.owner("sb-4") is None
    t.release("sb-1")
    t.reserve("sb-5", "alice", memory_mib=256)
    w.close()


def test_memory_quota_counts_sandboxes_and_pools(tmp_path: Path) -> None:
    w = make_world(tmp_path, max_tenant_memory_mib=1000)
    t = w.tenancy
    t.reserve("sb-1", "alice", memory_mib=400)
    w.store.add_pool(PoolRecord(tenant="alice", name="p", snapshot="s", min_size=0,
                                max_size=2, idle_timeout=None, network=None,
                                memory_mib=200, created=0.0))
    assert t.tenant_memory_mib("alice") == 800 and t.tenant_memory_mib("bob") == 0
    with pytest.raises(QuotaExceeded, match="would hold 1056 MiB"):
        t.reserve("sb-2", "alice", memory_mib=256)
    t.reserve("sb-2", "alice", memory_mib=200)
    with pytest.raises(QuotaExceeded, match="holds 1000 MiB; a pool would take it over"):
        t.check_memory("alice", 1, what="a pool")
    t.check_memory("bob", 1000, what="a pool")
    assert w.rejections() == 2
    w.close()


def test_reserve_all_is_all_or_none(tmp_path: Path) -> None:
    w = make_world(tmp_path, max_sandboxes=3)
    t = w.tenancy
    t.reserve("sb-0", "alice", memory_mib=1)
    with pytest.raises(QuotaExceeded):
        t.reserve_all(["sb-1", "sb-2", "sb-3"], "alice", memory_mib=1)
    assert w.store.owned("alice") == ["sb-0"]
    t.reserve_all(["sb-4", "sb-5"], "alice", memory_mib=1)
    assert w.store.owned("alice") == ["sb-0", "sb-4", "sb-5"]
    w.close()


def test_port_quota_is_per_tenant_over_its_live_sandboxes(tmp_path: Path) -> None:
    w = make_world(tmp_path, max_tenant_ports=2)
    t = w.tenancy
    t.reserve("sb-1", "alice", memory_mib=1)
    t.reserve("sb-2", "alice", memory_mib=1)
    t.reserve_port("alice", "sb-1", 80, "127.0.0.1")
    t.reserve_port("alice", "sb-2", 80, "127.0.0.1")
    t.reserve_port("alice", "sb-2", 80, "127.0.0.1")  # recorded already: passes
    with pytest.raises(QuotaExceeded, match="already has 2 ports exposed"):
        t.reserve_port("alice", "sb-1", 81, "127.0.0.1")
    t.release("sb-2")  # an ended sandbox's ports no longer count
    t.reserve_port("alice", "sb-1", 81, "127.0.0.1")
    w.close()


def test_snapshot_and_pool_quotas(tmp_path: Path) -> None:
    w = make_world(tmp_path, max_snapshots=2, max_pools=1, max_pool_size=4)
    t = w.tenancy
    t.check_snapshot_count("alice", 1)
    with pytest.raises(QuotaExceeded, match="has 2 snapshots, its quota"):
        t.check_snapshot_count("alice", 2)
    t.check_snapshot_bytes("alice", 10**12, None)
    with pytest.raises(QuotaExceeded, match="take 100 bytes on disk, its quota is 100"):
        t.check_snapshot_bytes("alice", 100, 100)
    big = t.snapshot_too_big("alice", "s1", QuotaExceeded("/srv/x", size=7, used=107), 100)
    assert "'s1' takes 7 bytes" in big.message and "/srv" not in big.message
    assert w.rejections() == 3
    with pytest.raises(QuotaExceeded, match="cap of 4 waiting sandboxes"):
        t.check_pools("alice", max_size=5, memory_mib=1)
    t.check_pools("alice", max_size=4, memory_mib=1)
    w.store.add_pool(PoolRecord(tenant="alice", name="p", snapshot="s", min_size=0,
                                max_size=1, idle_timeout=None, network=None, memory_mib=1,
                                created=0.0))
    with pytest.raises(QuotaExceeded, match="has 1 pools, its quota"):
        t.check_pools("alice", max_size=1, memory_mib=1)
    w.close()


def test_ttl_and_size_caps(tmp_path: Path) -> None:
    w = make_world(tmp_path, default_ttl=60, max_ttl=600, max_memory_mib=512, max_vcpus=2)
    t = w.tenancy
    assert t.check_ttl(None) == 60 and t.check_ttl(600) == 600
    for bad in (0, -1, 601):
        with pytest.raises(InvalidSpec, match=r"timeout must be seconds in \(0, 600\]"):
            t.check_ttl(bad)
    t.check_size(memory_mib=512, vcpus=2)
    with pytest.raises(InvalidSpec, match="memory_mib 513 is over"):
        t.check_size(memory_mib=513, vcpus=1)
    with pytest.raises(InvalidSpec, match="vcpus 3 is over"):
        t.check_size(memory_mib=256, vcpus=3)
    w.close()


# ---------------------------------------------------------------------------- new sandboxes


def test_new_owned_holds_what_make_made_or_frees_its_quota(tmp_path: Path) -> None:
    w = make_world(tmp_path, max_sandboxes=1)
    t = w.tenancy
    made: list[str] = []

    async def make(sid: str, ttl: float) -> AsyncSandbox:
        assert ttl == w.config.default_ttl
        with pytest.raises(SandboxStateError, match="still starting"):  # while making it
            w.journal.add(sid, state="starting")
            t.record("alice", sid)
        w.journal.update(sid, state="running", keeper_pid=os.getpid(),
                         keeper_start=proc_start_time(os.getpid()))
        made.append(sid)
        return held(FakeSandbox(sid))

    async def broken(sid: str, ttl: float) -> AsyncSandbox:
        raise InvalidSpec("no such image")

    async def go() -> None:
        with pytest.raises(InvalidSpec):
            await t.new_owned("alice", memory_mib=256, ttl=None, make=broken)
        assert w.store.owned("alice") == []  # its quota is free again
        info = await t.new_owned("alice", memory_mib=256, ttl=None, make=make)
        assert info.sandbox_id == made[0] and t.holding(made[0]) is not None
        with pytest.raises(QuotaExceeded):
            await t.new_owned("alice", memory_mib=256, ttl=None, make=make)

    asyncio.run(go())
    assert w.metrics.sandboxes_created.value(outcome="ok") == 1
    assert w.metrics.sandboxes_created.value(outcome="error") == 1
    w.close()


# ---------------------------------------------------------------------------- explanations


def test_explain_tells_an_ended_sandbox_from_a_broken_channel(world: World) -> None:
    t = world.tenancy
    world.owned("sb-a1", "alice")
    dropped: list[str] = []

    async def hook(sid: str) -> None:
        dropped.append(sid)

    t.on_drop(hook)

    async def go() -> None:
        guest = GuestFileNotFound("no such file: /x")
        assert await t.explain("sb-a1", guest) is guest  # the guest's own errors stay
        bad = InvalidSpec("x")
        assert await t.explain("sb-a1", bad) is bad
        world.journal.end("sb-a1", "ttl")
        broke = AgentDisconnected("agent channel read failed")
        err = await t.explain("sb-a1", broke)
        assert isinstance(err, SandboxStateError) and err.__cause__ is broke
        assert err.message == "sandbox sb-a1 ended while the request ran (ttl)"

    asyncio.run(go())
    assert dropped == ["sb-a1"] and world.store.owned("alice") == []


def test_sandbox_info_reads_the_journal_record(world: World) -> None:
    world.running("sb-r", memory_mib=512)
    rec = world.journal.get("sb-r")
    assert rec is not None
    info = sandbox_info(rec)
    assert (info.image, info.memory_mib, info.vcpus, info.network) == ("base", 512, 1, False)


# ---------------------------------------------------------------------------- the store


def test_the_store_reads_pools_an_older_server_kept(tmp_path: Path) -> None:
    """Pools used to be made and queried by the Library on the store's connection; the
    store owns those tables now, with the same layout, so a server.db written before
    (here: by the old statements, and without sandboxes.memory_mib) opens as it was."""
    import json
    import sqlite3

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = sqlite3.connect(state / "server.db")
    db.executescript("""
        CREATE TABLE sandboxes (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                                created REAL NOT NULL, ended REAL);
        CREATE TABLE pools (tenant TEXT NOT NULL, name TEXT NOT NULL, snapshot TEXT NOT NULL,
                            min_size INTEGER NOT NULL, max_size INTEGER NOT NULL,
                            idle_timeout REAL, network TEXT, memory_mib INTEGER NOT NULL,
                            created REAL NOT NULL, PRIMARY KEY (tenant, name));
        CREATE TABLE pool_members (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                                   pool TEXT NOT NULL);
    """)
    db.execute("INSERT INTO sandboxes VALUES ('sb-old', 'alice', 1.0, NULL)")
    db.execute("INSERT INTO pools VALUES ('alice', 'web', 'snap1', 1, 3, 30.0, ?, 256, 5.0)",
               (json.dumps({"allow": ["example.com"]}),))
    db.execute("INSERT INTO pool_members VALUES ('sb-wait', 'alice', 'web')")
    db.commit()
    db.close()
    store = ServerStore(state)
    try:
        (pool,) = store.pools()
        assert pool == PoolRecord(tenant="alice", name="web", snapshot="snap1", min_size=1,
                                  max_size=3, idle_timeout=30.0,
                                  network={"allow": ["example.com"]}, memory_mib=256,
                                  created=5.0)
        assert store.pool("alice", "web") == pool and store.pool("bob", "web") is None
        assert store.pools_using("alice", "snap1") == ["web"]
        assert store.pool_totals("alice") == (1, 3) and store.pool_memory_mib("alice") == 768
        assert store.pool_members() == ["sb-wait"]
        assert store.memory_in_use("alice") == 0  # the old sandbox counts as 0 MiB
        assert not store.add_pool(pool)  # taken
        store.reserve_within("sb-ph", "alice", limit=5, memory_mib=1, max_memory_mib=None)
        assert store.hand_out("sb-ph", "sb-wait") and store.pool_members() == []
        assert store.owner("sb-wait") == ("alice", None) and store.owner("sb-ph") is None
        assert not store.hand_out("sb-ph", "sb-other")  # the reservation is gone
        assert store.remove_pool("alice", "web") and store.pools() == []
    finally:
        store.close()
