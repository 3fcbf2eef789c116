"""The server under load: CLIENTS concurrent clients (default 20), each taking a sandbox
from a warm pool over HTTP and running COMMANDS commands in it (default 50), all at
once, on 127.0.0.1. Every command's output is checked; any failure counts as an error.

Also create-from-pool over HTTP, one at a time (POOL_N, default 20), against the
pool's own restore time. Prints JSON. ``run_load`` is also the load test
(tests/test_server_load.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from _util import summary

CLIENTS = int(os.environ.get("LOAD_CLIENTS", "20"))
COMMANDS = int(os.environ.get("LOAD_COMMANDS", "50"))
POOL_N = int(os.environ.get("POOL_N", "20"))


def _summary(xs: list[float]) -> dict[str, float]:
    """``summary`` in ms; empty if nothing was measured (every client failed)."""
    return summary(xs) if xs else {}


async def _commands(sb: Any, i: int, n: int, times: list[float],
                    errors: list[str]) -> None:
    """Client ``i``'s ``n`` commands in ``sb`` (local or remote), each timed and its
    output checked."""
    for j in range(n):
        t0 = time.perf_counter()
        r = await sb.commands.run(["echo", f"{i}.{j}"])
        times.append(time.perf_counter() - t0)
        if r.stdout != f"{i}.{j}\n":
            errors.append(f"client {i} command {j}: stdout {r.stdout!r}")


async def run_load(url: str, key: str, pool: str, *, clients: int = CLIENTS,
                   commands: int = COMMANDS) -> dict[str, Any]:
    """``clients`` concurrent clients, each: a sandbox from ``pool``, ``commands``
    commands (output checked), kill. Returns latencies (ms) and every error seen."""
    from sandvm.client import AsyncPool

    errors: list[str] = []
    acquire_s: list[float] = []
    command_s: list[float] = []
    start = asyncio.Event()

    async def client(i: int) -> None:
        p = await AsyncPool.connect(pool, api_key=key, url=url)
        await start.wait()
        try:
            t0 = time.perf_counter()
            sb = await p.acquire(timeout=60, ttl=600)
            acquire_s.append(time.perf_counter() - t0)
            try:
                await _commands(sb, i, commands, command_s, errors)
            finally:
                await sb.kill()
        except Exception as exc:  # noqa: BLE001 - every failure is a figure
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")
        finally:
            await p.close()

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(0.2)  # every client connected: start together
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    return {"clients": clients, "commands_per_client": commands, "errors": errors,
            "wall_s": round(wall, 2),
            "commands_per_s": round(len(command_s) / wall, 1) if wall else None,
            "acquire_ms": _summary(acquire_s), "command_ms": _summary(command_s)}


async def run_local(snapshot: Any, *, clients: int = CLIENTS,
                    commands: int = COMMANDS) -> dict[str, Any]:
    """The same load without HTTP: ``clients`` sandboxes restored in this process, the
    same commands (what the server's figures compare with)."""
    from sandvm import AsyncSandbox

    sbs = await asyncio.gather(*(AsyncSandbox.from_snapshot(snapshot)
                                 for _ in range(clients)))
    command_s: list[float] = []
    errors: list[str] = []

    try:
        await asyncio.sleep(1.0)  # as in the server case: all restored and settled
        t0 = time.perf_counter()
        await asyncio.gather(*(_commands(sb, i, commands, command_s, errors)
                               for i, sb in enumerate(sbs)))
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(sb.kill() for sb in sbs))
    return {"errors": len(errors), "wall_s": round(wall, 2),
            "commands_per_s": round(len(command_s) / wall, 1),
            "command_ms": _summary(command_s)}


if __name__ == "__main__":
    from _util import emit, serve

    with serve("--max-sandboxes", str(CLIENTS + 4), "--max-pool-size",
               str(CLIENTS + 6)) as (url, key, tmp):
        from sandvm.client import Pool, Sandbox
        from sandvm.snapshots.store import SnapshotStore

        src = Sandbox.create(api_key=key, url=url, timeout=3600)
        src.commands.run("echo warm > /root/warm")
        src.snapshot("load")
        src.kill()
        local = asyncio.run(run_local(SnapshotStore(f"{tmp}/state/snapshots/bench")
                                      .get("load")))

        # ---- create-from-pool, one at a time (the pool refills between)
        pool = Pool.create(name="one", snapshot="load", min_size=2, max_size=2,
                           api_key=key, url=url)
        deadline = time.monotonic() + 120
        while pool.stats().ready < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        one: list[float] = []
        for _ in range(POOL_N):
            while pool.stats().ready < 1:
                time.sleep(0.02)
            t0 = time.perf_counter()
            with pool.acquire() as sb:
                one.append(time.perf_counter() - t0)
                sb.commands.run("true")
        restore = pool.stats()
        pool.delete()

        # ---- the load: CLIENTS at once, the pool warm for all of them
        pool = Pool.create(name="load", snapshot="load", min_size=CLIENTS,
                           max_size=CLIENTS + 4, api_key=key, url=url)
        t_fill = time.perf_counter()
        deadline = time.monotonic() + 600
        while pool.stats().ready < CLIENTS and time.monotonic() < deadline:
            time.sleep(0.1)
        fill_s = time.perf_counter() - t_fill
        load = asyncio.run(run_load(url, key, "load"))
        hits = pool.stats().hits
        pool.delete()

    emit({
        "create_from_pool_http_ms": _summary(one),
        "pool_restore_ms": {"p50": restore.restore_ms_p50, "p99": restore.restore_ms_p99},
        "load": {**load, "errors": len(load["errors"]), "error_samples": load["errors"][:5],
                 "pool_hits": hits, "pool_fill_s": round(fill_s, 2)},
        "load_local_same_vms": local,
    })
