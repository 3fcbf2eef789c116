"""Pool acquire: hit p50/p99 (targets 1 ms / 5 ms), 8 concurrent acquires from an
empty pool (not serialized: wall time < summed restore time), fork(8) of a running sandbox."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from _util import emit, summary

from sandvm import AsyncSandbox
from sandvm.pools import AsyncPool
from sandvm.snapshots import SnapshotStore


async def main() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SnapshotStore(Path(tmp))
        sb = await AsyncSandbox.create()
        snap = await sb.snapshot("pool", stop=True, store=store)
        hits = []
        async with AsyncPool(snapshot=snap, min_size=4, max_size=8, store=store) as pool:
            for _ in range(40):
                await pool.wait_ready(1, timeout=120)
                t0 = time.perf_counter()
                got = await pool.acquire(timeout=30)
                hits.append(time.perf_counter() - t0)
                await pool.release(got)
            st = pool.stats()
        async with AsyncPool(snapshot=snap, min_size=0, max_size=8, store=store) as pool:
            t0 = time.perf_counter()
            got8 = await asyncio.gather(*(pool.acquire(timeout=120) for _ in range(8)))
            wall8 = time.perf_counter() - t0
            restores = pool.restore_times
            await asyncio.gather(*(pool.release(s) for s in got8))
        src = await AsyncSandbox.create()
        t0 = time.perf_counter()
        clones = await src.fork(8)
        fork8 = time.perf_counter() - t0
        await asyncio.gather(*(c.kill() for c in clones), src.kill())
    return {"benchmark": "pool_and_fork", "accelerator": "tcg",
            "acquire_hit_ms": summary(hits), "target_hit_p50_ms": 1, "target_hit_p99_ms": 5,
            "pool_stats": st.to_dict(),
            "concurrent_8_from_empty": {"wall_ms": round(wall8 * 1000, 1),
                                        "sum_of_restores_ms": round(sum(restores) * 1000, 1),
                                        "restore_ms": summary(restores)},
            "fork8_total_ms": round(fork8 * 1000, 1), "target_fork8_ms": 2000}


emit(asyncio.run(main()))
