"""Host memory of idle clones of one 512 MiB snapshot: extra PSS per clone (target:
16 clones <= 16 x 40 MiB), measured from /proc/<pid>/smaps_rollup (PSS, not RSS).
Then keeps adding clones up to DENSITY_MAX (env, default 48) and reports what it held."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from _util import emit

from sandvm import AsyncSandbox
from sandvm.snapshots import SnapshotStore

MAX = int(os.environ.get("DENSITY_MAX", "48"))


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


async def main() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SnapshotStore(Path(tmp))
        sb = await AsyncSandbox.create(memory_mib=512)
        await sb.commands.run("python3 -c 'import json'")
        snap = await sb.snapshot("dense", stop=True, store=store)
        avail0 = mem_available_kib()
        clones: list[AsyncSandbox] = []
        at16: dict[str, float] = {}
        t0 = time.monotonic()
        while len(clones) < MAX:
            batch = await asyncio.gather(*(AsyncSandbox.from_snapshot(snap, store=store)
                                           for _ in range(4)))
            for c in batch:
                await c.commands.run("true")
            clones.extend(batch)
            if len(clones) == 16:
                await asyncio.sleep(2)
                pss = [pss_kib(c.info["qemu_pid"]) for c in clones]
                at16 = {"clones": 16, "total_pss_mib": round(sum(pss) / 1024, 1),
                        "pss_per_clone_mib": round(sum(pss) / 1024 / 16, 1),
                        "host_mem_used_mib": round((avail0 - mem_available_kib()) / 1024, 1)}
        await asyncio.sleep(2)
        pss = [pss_kib(c.info["qemu_pid"]) for c in clones]
        used = (avail0 - mem_available_kib()) / 1024
        held = {"clones": len(clones), "total_pss_mib": round(sum(pss) / 1024, 1),
                "pss_per_clone_mib": round(sum(pss) / 1024 / len(clones), 1),
                "host_mem_used_mib": round(used, 1),
                "seconds_to_start_all": round(time.monotonic() - t0, 1)}
        per = used / len(clones)
        await asyncio.gather(*(c.kill() for c in clones))
    return {"benchmark": "clone_density", "accelerator": "tcg", "snapshot_memory_mib": 512,
            "at_16": at16, "target_16_total_pss_mib": 16 * 40, "largest_run": held,
            "estimated_capacity_clones": int(avail0 / 1024 / per) if per else None,
            "estimate_note": "MemAvailable at start / measured host memory per idle clone;"
                             " an extrapolation, not a run"}


emit(asyncio.run(main()))
