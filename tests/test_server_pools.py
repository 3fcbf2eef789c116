"""Snapshots, fork and warm pools over HTTP, through `sandvm serve` and the real client.

A server of this module's own (6 sandboxes per tenant); alice's sandbox has a file and
a running process when it is snapshotted, and every sandbox made from the snapshot
must have both. Bob is another tenant: none of alice's snapshots or pools exist for
him.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandvm.client import Pool, Sandbox, SnapshotStore
from sandvm.errors import (
    InvalidSpec,
    PoolError,
    PoolExhausted,
    PoolExists,
    PoolNotFound,
    QuotaExceeded,
    SnapshotAlreadyExists,
    SnapshotInUse,
    SnapshotNotFound,
    VmNotFound,
)
from sandvm.runtime.journal import Journal
from test_server import ServerProc, _auth, until

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(tmp_path_factory.mktemp("server"), max_sandboxes=6,
                     extra=("--max-snapshots", "3"))
    srv.alice, srv.bob = srv.key("alice"), srv.key("bob")
    with srv.running():
        yield srv


@pytest.fixture(scope="module")
def source(server: ServerProc) -> Iterator[Sandbox]:
    """Alice's sandbox with /root/state and a process (its pid in /root/pid)."""
    sb = Sandbox.create(api_key=server.alice, url=server.url, timeout=900)
    sb.files.write("/root/state", "before the snapshot")
    sb.commands.run("sleep 100000 & echo $! > /root/pid")
    yield sb
    sb.kill()


@pytest.fixture(scope="module")
def snap(server: ServerProc, source: Sandbox) -> str:
    info = source.snapshot("ready")
    assert info.name == "ready" and info.source_id == source.sandbox_id
    return info.name


def _alive(sb: Sandbox) -> bool:
    """Whether the process the source started before its snapshot runs in ``sb``."""
    return sb.commands.run("kill -0 $(cat /root/pid)", check=False).exit_code == 0


def _live_in_journal(server: ServerProc) -> set[str]:
    j = Journal(server.tmp / "journal.db")
    try:
        return {r.id for r in j.sandboxes() if r.state != "ended"}
    finally:
        j.close()



def test_snapshot_restore_and_tenancy(server: ServerProc, source: Sandbox, snap: str) -> None:
    alice = SnapshotStore(api_key=server.alice, url=server.url)
    bob = SnapshotStore(api_key=server.bob, url=server.url)
    assert [s.name for s in alice.list()] == [snap]
    info = alice.get(snap)
    assert info.memory_mib == 256 and info.size_bytes > 0
    assert bob.list() == []
    with pytest.raises(SnapshotNotFound):
        bob.get(snap)
    with pytest.raises(SnapshotNotFound):
        Sandbox.from_snapshot(snap, api_key=server.bob, url=server.url)
    with pytest.raises(SnapshotAlreadyExists):
        source.snapshot(snap)
    with pytest.raises(InvalidSpec):
        source.snapshot("../escape")
    r = httpx.post(f"{server.url}/v1/sandboxes", headers=_auth(server.alice),
                   json={"snapshot": snap, "memory_mib": 512})
    assert r.status_code == 400 and "memory_mib" in r.json()["message"]

    copy = Sandbox.from_snapshot(snap, api_key=server.alice, url=server.url, timeout=120)
    try:
        assert copy.sandbox_id != source.sandbox_id
        assert copy.files.read("/root/state") == "before the snapshot"
        assert _alive(copy)
        assert copy.commands.run("hostname").stdout.strip() == copy.sandbox_id
        copy.files.write("/root/state", "changed in the copy")
        assert source.files.read("/root/state") == "before the snapshot"
        assert copy.sandbox_id in {i.sandbox_id for i in Sandbox.list(
            api_key=server.alice, url=server.url)}
        with pytest.raises(VmNotFound):
            Sandbox.connect(copy.sandbox_id, api_key=server.bob, url=server.url)
    finally:
        copy.kill()

    other = source.snapshot()  # a generated name; removed again
    assert other.name.startswith("snap-")
    alice.remove(other.name)
    with pytest.raises(SnapshotNotFound):
        alice.get(other.name)
    with pytest.raises(SnapshotNotFound):
        alice.remove(other.name)


def test_fork_copies_state_and_respects_the_quota(server: ServerProc, source: Sandbox,
                                                   snap: str) -> None:
    copies = source.fork(2, timeout=120)
    try:
        assert len({c.sandbox_id for c in copies} | {source.sandbox_id}) == 3
        for c in copies:
            assert c.files.read("/root/state") == "before the snapshot"
            assert _alive(c)
        copies[0].files.write("/root/state", "mine")
        assert copies[1].files.read("/root/state") == "before the snapshot"
        before = {i.sandbox_id for i in Sandbox.list(api_key=server.alice, url=server.url)}
        with pytest.raises(QuotaExceeded):  # 3 live + 4 > 6: all refused, none made
            source.fork(4)
        after = {i.sandbox_id for i in Sandbox.list(api_key=server.alice, url=server.url)}
        assert after == before
        with pytest.raises(InvalidSpec):
            source.fork(0)
    finally:
        for c in copies:
            c.kill()


def test_pool_hands_out_restored_sandboxes(server: ServerProc, source: Sandbox,
                                           snap: str) -> None:
    with Pool.create(name="warm", snapshot=snap, min_size=2, max_size=3,
                     api_key=server.alice, url=server.url) as pool:
        until(lambda: pool.stats().ready == 2, "two waiting sandboxes")
        waiting = _live_in_journal(server)
        with pytest.raises(PoolExists):
            Pool.create(name="warm", snapshot=snap, api_key=server.alice, url=server.url)
        with pytest.raises(PoolNotFound):
            Pool.connect("warm", api_key=server.bob, url=server.url)
        with pytest.raises(SnapshotInUse):
            SnapshotStore(api_key=server.alice, url=server.url).remove(snap)
        # waiting sandboxes belong to nobody: not listed, not reachable
        listed = {i.sandbox_id for i in Sandbox.list(api_key=server.alice, url=server.url)}
        assert listed == {source.sandbox_id}
        with pool.acquire(timeout=60) as sb:
            assert sb.sandbox_id in waiting  # one of the waiting ones: a hit
            assert sb.files.read("/root/state") == "before the snapshot"
            assert _alive(sb)
            assert sb.sandbox_id in {i.sandbox_id for i in Sandbox.list(
                api_key=server.alice, url=server.url)}
            info = sb.get_info()
            assert info.expires_at is not None and info.expires_at - time.time() > 30
            st = pool.stats()
            assert st.hits == 1 and st.misses == 0
            until(lambda: pool.stats().ready == 2, "the pool to refill")
            taken = sb.sandbox_id
        assert taken not in _live_in_journal(server)  # killed at the end of the block
        names = [p.name for p in Pool.list(api_key=server.alice, url=server.url)]
        assert names == ["warm"]
        members = _live_in_journal(server) - {source.sandbox_id}
        assert len(members) == 2
    # deleting the pool killed its waiting sandboxes
    assert not members & _live_in_journal(server)
    assert Pool.list(api_key=server.alice, url=server.url) == []


def test_pool_comes_back_after_a_restart(server: ServerProc, source: Sandbox,
                                         snap: str) -> None:
    pool = Pool.create(name="kept", snapshot=snap, min_size=1, max_size=2,
                       api_key=server.alice, url=server.url)
    try:
        until(lambda: pool.stats().ready == 1, "a waiting sandbox")
        old = _live_in_journal(server) - {source.sandbox_id}
        assert len(old) == 1
        server.stop(signal.SIGKILL)  # no clean stop: the next server repairs
        server.start()
        again = Pool.connect("kept", api_key=server.alice, url=server.url)
        until(lambda: again.stats().ready == 1, "the pool to refill after the restart")
        assert not old & _live_in_journal(server)  # the dead server's waiting one: killed
        with again.acquire() as sb:
            assert sb.files.read("/root/state") == "before the snapshot"
        again.close()
        assert source.files.read("/root/state") == "before the snapshot"
    finally:
        pool.delete()


def test_bad_pool_requests(server: ServerProc, snap: str) -> None:
    h = _auth(server.alice)
    for body, status in (({"name": "x", "snapshot": "nope"}, 404),
                         ({"name": "x", "snapshot": snap, "min_size": 3, "max_size": 2}, 400),
                         ({"name": "x", "snapshot": snap, "max_size": 1000}, 429),
                         ({"name": "../x", "snapshot": snap}, 422)):
        r = httpx.post(f"{server.url}/v1/pools", headers=h, json=body)
        assert r.status_code == status, (body, r.text)
    r = httpx.post(f"{server.url}/v1/sandboxes", headers=h, json={"pool": "nope"})
    assert (r.status_code, r.json()["code"]) == (404, "pool_not_found")
    r = httpx.post(f"{server.url}/v1/sandboxes", headers=h,
                   json={"pool": "a", "snapshot": snap})
    assert r.status_code == 400


def test_snapshots_are_per_tenant_on_disk(server: ServerProc, snap: str) -> None:
    root = server.tmp / "state" / "snapshots"
    assert (root / "alice" / snap / "manifest.json").exists()
    assert not (root / "bob").exists() or not any(Path(root / "bob").iterdir())


def test_pool_miss_waits_for_a_restore_and_can_time_out(server: ServerProc, snap: str) -> None:
    with Pool.create(name="cold", snapshot=snap, min_size=0, max_size=2,
                     api_key=server.alice, url=server.url) as pool:
        assert pool.stats().ready == 0
        with pytest.raises(PoolExhausted), pool.acquire(timeout=0.01):
            pass  # nothing waits, and 10 ms is too short for a restore
        db = sqlite3.connect(server.tmp / "state" / "server.db")
        try:  # the timed-out take gave its quota back at once (not at the next reap)
            (held,) = db.execute("SELECT count(*) FROM sandboxes WHERE tenant = 'alice'"
                                 " AND ended IS NULL").fetchone()
        finally:
            db.close()
        assert held == 1  # the source sandbox only
        with pool.acquire(timeout=60) as sb:  # a miss: restored for this request
            assert sb.files.read("/root/state") == "before the snapshot"
        st = pool.stats()
        assert st.misses == 2 and st.timeouts == 1


def test_snapshot_quota_holds_against_concurrent_requests(server: ServerProc,
                                                          source: Sandbox, snap: str) -> None:
    store = SnapshotStore(api_key=server.alice, url=server.url)
    assert len(store.list()) == 1  # "ready"; this server keeps 3 per tenant
    outcomes: list[str] = []

    def take(i: int) -> None:
        sb = Sandbox.connect(source.sandbox_id, api_key=server.alice, url=server.url)
        try:
            sb.snapshot(f"race-{i}")
            outcomes.append("ok")
        except QuotaExceeded:
            outcomes.append("quota")
        finally:
            sb.close()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["ok", "ok", "quota", "quota"]
    for s in store.list():
        if s.name.startswith("race-"):
            store.remove(s.name)


def test_a_pool_that_cannot_start_again_stays_listed_and_deletable(
        server: ServerProc, source: Sandbox, snap: str) -> None:
    source.snapshot("fragile")
    pool = Pool.create(name="fragile", snapshot="fragile", min_size=0, max_size=1,
                       api_key=server.alice, url=server.url)
    server.stop()
    state = server.tmp / "state" / "snapshots" / "alice" / "fragile" / "state"
    state.write_bytes(state.read_bytes()[:100])  # damaged while the server was down
    server.start()
    (info,) = [p for p in Pool.list(api_key=server.alice, url=server.url)
               if p.name == "fragile"]
    assert info.ready == 0 and info.last_error is not None
    assert "snapshot_corrupt" in info.last_error and "/" not in info.last_error
    broken = Pool.connect("fragile", api_key=server.alice, url=server.url)
    with pytest.raises(PoolError), broken.acquire():
        pass
    broken.close()
    r = httpx.get(f"{server.url}/v1/snapshots/fragile", headers=_auth(server.alice))
    assert r.status_code == 409 and str(server.tmp) not in r.text  # no server paths
    with pytest.raises(SnapshotInUse):
        SnapshotStore(api_key=server.alice, url=server.url).remove("fragile")
    pool.delete()
    SnapshotStore(api_key=server.alice, url=server.url).remove("fragile")
    assert [p.name for p in Pool.list(api_key=server.alice, url=server.url)] == []


def test_snapshot_bytes_quota_refuses_a_save_and_keeps_nothing(server: ServerProc,
                                                               source: Sandbox,
                                                               snap: str) -> None:
    """`--max-snapshot-bytes`: the server restarts with a cap 1 MiB above what alice's
    snapshots take on disk; a save (far more than 1 MiB of RAM) is refused with 429
    quota_exceeded, names no server path, and leaves nothing in her store."""
    from sandvm.snapshots import SnapshotStore as DiskStore

    root = server.tmp / "state" / "snapshots" / "alice"
    used = DiskStore(root).bytes_used()
    listing = sorted(p.name for p in root.iterdir() if p.name != ".quota.lock")
    extra = server.extra
    server.stop()
    server.extra = (*extra, "--max-snapshot-bytes", str(used + (1 << 20)))
    server.start()
    try:
        r = httpx.post(f"{server.url}/v1/sandboxes/{source.sandbox_id}/snapshots",
                       headers=_auth(server.alice), json={"name": "too-big"}, timeout=120)
        assert (r.status_code, r.json()["code"]) == (429, "quota_exceeded"), r.text
        assert "quota" in r.json()["message"] and str(server.tmp) not in r.text
        assert sorted(p.name for p in root.iterdir() if p.name != ".quota.lock") == listing
        assert DiskStore(root).bytes_used() == used
        with pytest.raises(SnapshotNotFound):
            SnapshotStore(api_key=server.alice, url=server.url).get("too-big")
        assert source.files.read("/root/state") == "before the snapshot"  # still running
        # a store already at its cap refuses before the sandbox is even paused
        filler = root / "filler"  # not a snapshot, but disk the store takes
        filler.mkdir()
        (filler / "blob").write_bytes(os.urandom(1 << 20))
        try:
            r = httpx.post(f"{server.url}/v1/sandboxes/{source.sandbox_id}/snapshots",
                           headers=_auth(server.alice), json={"name": "too-big"})
            assert (r.status_code, r.json()["code"]) == (429, "quota_exceeded"), r.text
            assert "bytes on disk, its quota is" in r.json()["message"]
        finally:
            shutil.rmtree(filler)
        assert sorted(p.name for p in root.iterdir() if p.name != ".quota.lock") == listing
    finally:
        server.stop()
        server.extra = extra
        server.start()
