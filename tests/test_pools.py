"""Warm pools over real restores: hits, misses, exhaustion, concurrency, trimming, close."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from sandvm import AsyncSandbox
from sandvm.errors import InvalidSpec, PoolClosed, PoolExhausted
from sandvm.pools import AsyncPool, Pool
from sandvm.providers.qemu import runtime_root

pytestmark = pytest.mark.qemu


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sync_pool_hit_release_refill(base_snapshot: Any, snapshot_store: Any) -> None:
    with Pool(snapshot=base_snapshot, min_size=2, max_size=4, store=snapshot_store) as pool:
        pool.wait_ready(2, timeout=60)
        with pool.acquire(timeout=5) as s:
            assert s.commands.run("python3 -c 'print(1)'").stdout == "1\n"
            first_id, first_pid = s.sandbox_id, s.info["qemu_pid"]
        st = pool.stats()
        assert st.hits == 1 and st.misses == 0 and st.in_use == 0
        # the released VM is destroyed, never handed out again
        deadline = time.monotonic() + 5
        while _alive(first_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(first_pid)
        with pool.acquire(timeout=5) as s:
            assert s.sandbox_id != first_id
        pool.wait_ready(2, timeout=60)  # refilled
        st = pool.stats()
        assert st.ready == 2 and st.restored >= 4 and st.restore_ms_p50 is not None


def test_exhaustion_and_close(base_snapshot: Any, snapshot_store: Any) -> None:
    async def main() -> None:
        before = set(os.listdir(runtime_root()))
        pool = await AsyncPool(snapshot=base_snapshot, min_size=1, max_size=1,
                               store=snapshot_store).start()
        held = await pool.acquire(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(PoolExhausted, match="max_size=1"):
            await pool.acquire(timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 3
        assert pool.stats().timeouts == 1
        pid = held.info["qemu_pid"]
        await pool.close()
        assert not await held.is_running() and not _alive(pid)
        with pytest.raises(PoolClosed):
            await pool.acquire(timeout=1)
        assert set(os.listdir(runtime_root())) == before

    asyncio.run(main())


def test_concurrent_acquires_restore_in_parallel(base_snapshot: Any,
                                                 snapshot_store: Any) -> None:
    async def main() -> None:
        async with AsyncPool(snapshot=base_snapshot, min_size=0, max_size=4,
                             store=snapshot_store) as pool:
            t0 = time.monotonic()
            got = await asyncio.gather(*(pool.acquire(timeout=60) for _ in range(4)))
            wall = time.monotonic() - t0
            assert len({sb.sandbox_id for sb in got}) == 4
            st = pool.stats()
            assert st.misses == 4 and st.in_use == 4
            # not serialized behind one worker: the wall time is less than the restores'
            # summed durations
            assert wall < sum(pool.restore_times)
            outs = await asyncio.gather(*(sb.commands.run("hostname") for sb in got))
            assert [o.stdout.strip() for o in outs] == [sb.sandbox_id for sb in got]
            await asyncio.gather(*(pool.release(sb) for sb in got))

    asyncio.run(main())


def test_idle_trimming_keeps_min_size(base_snapshot: Any, snapshot_store: Any) -> None:
    async def main() -> None:
        async with AsyncPool(snapshot=base_snapshot, min_size=2, max_size=3,
                             idle_timeout=0.3, store=snapshot_store) as pool:
            await pool.wait_ready(2, timeout=60)
            assert await pool.trim() == 0  # never below min_size
            pool.min_size = 0
            # the janitor (every idle_timeout/2) trims both once they idled 0.3 s: how
            # soon it gets to run depends on the machine, so wait for it (bounded)
            deadline = time.monotonic() + 30
            while pool.stats().ready and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            st = pool.stats()
            assert st.ready == 0 and st.trimmed == 2

    asyncio.run(main())


def test_pool_input_checked() -> None:
    for kw in ({"min_size": 3, "max_size": 2}, {"max_size": 0}, {"min_size": -1},
               {"idle_timeout": 0}):
        with pytest.raises(InvalidSpec):
            AsyncPool(snapshot="x", **kw)  # type: ignore[arg-type]


def test_dead_ready_sandbox_is_not_handed_out(base_snapshot: Any,
                                               snapshot_store: Any) -> None:
    async def main() -> None:
        async with AsyncPool(snapshot=base_snapshot, min_size=1, max_size=2,
                             store=snapshot_store) as pool:
            await pool.wait_ready(1, timeout=60)
            victim: AsyncSandbox = pool._ready[0][0]
            os.kill(victim.info["qemu_pid"], 9)
            deadline = time.monotonic() + 30  # until its death is noticed (bounded)
            while victim._vm.failure is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            sb = await pool.acquire(timeout=30)
            assert sb is not victim
            assert (await sb.commands.run("echo ok")).stdout == "ok\n"
            await pool.release(sb)

    asyncio.run(main())
