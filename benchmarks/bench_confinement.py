"""What confining QEMU costs (its own uid and namespaces, README "Confinement"): QEMU's
start up to its QMP greeting (where the confinement's own cost shows, without the
guest's boot noise), cold boot, restore to ready and a live snapshot's pause, confined
and unconfined (``SANDVM_CONFINE=0``) alternated in one run, so both see the same
machine load. Also the host-side bytes kept for a guest that floods its console."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _util import emit, summary

from sandvm import Sandbox
from sandvm.assets import find_assets
from sandvm.core import VmSpec
from sandvm.providers import jail
from sandvm.providers.qemu import (
    build_argv,
    child_setup,
    confinement,
    prepare_launch,
    runtime_root,
)
from sandvm.providers.qmp import QmpClient
from sandvm.snapshots import SnapshotStore

BOOTS = 3
RESTORES = 20
SNAPSHOTS = 3  # live snapshots per booted VM
MODES = {"confined": "1", "unconfined": "0"}


def mode(name: str) -> None:
    os.environ["SANDVM_CONFINE"] = MODES[name]


STARTS = 20


async def start_to_qmp() -> float:
    """Seconds from preparing a QEMU (sockets, lease, plan) to its QMP greeting."""
    assets = find_assets()
    rundir = Path(tempfile.mkdtemp(prefix="bench-", dir=runtime_root()))
    try:
        t0 = time.monotonic()
        launch = prepare_launch(rundir, assets=assets, spec=VmSpec(), accel="tcg")
        argv = [*build_argv(assets=assets, spec=VmSpec(), accel="tcg", rundir=rundir,
                            fds=launch.fds), "-S"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, pass_fds=launch.qemu_fds(),
            preexec_fn=functools.partial(child_setup, launch.plan, os.getpid()))
        launch.close_qemu_side()
        qmp = QmpClient()
        await qmp.connect(str(rundir / "qmp.sock"))
        took = time.monotonic() - t0
        await qmp.close()
        proc.kill()
        await proc.wait()
        launch.close_all()
        return took
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


start: dict[str, list[float]] = {m: [] for m in MODES}
for _ in range(STARTS):
    for m in MODES:
        mode(m)
        start[m].append(asyncio.run(start_to_qmp()))
boot: dict[str, list[float]] = {m: [] for m in MODES}
restore: dict[str, list[float]] = {m: [] for m in MODES}
pause: dict[str, list[float]] = {m: [] for m in MODES}
with tempfile.TemporaryDirectory() as tmp:
    store = SnapshotStore(Path(tmp))
    snaps = {}
    for i in range(BOOTS):
        for m in MODES:
            mode(m)
            t0 = time.monotonic()
            sb = Sandbox.create()
            boot[m].append(time.monotonic() - t0)
            sb.commands.run(["true"])
            for k in range(SNAPSHOTS):
                snap = sb.snapshot(f"{m}{i}-{k}", store=store)
                pause[m].append(sb.last_snapshot_times["pause_s"])
            snaps[m] = snap
            sb.kill()
    for m in MODES:  # first use verifies the RAM file: not part of the figure
        mode(m)
        Sandbox.from_snapshot(snaps[m], store=store).kill()
    for _ in range(RESTORES):
        for m in MODES:
            mode(m)
            t0 = time.monotonic()
            c = Sandbox.from_snapshot(snaps[m], store=store)
            restore[m].append(time.monotonic() - t0)
            c.kill()
    mode("confined")
    flood_mib = 16
    c = Sandbox.from_snapshot(snaps["confined"], store=store)
    t0 = time.monotonic()
    c.commands.run(f"head -c {flood_mib << 20} /dev/zero | tr '\\0' x > /dev/ttyS0",
                   timeout=900)
    flood_s = time.monotonic() - t0
    rundir = c._a._vm.rundir
    assert rundir is not None
    kept = sum(p.stat().st_size for p in rundir.glob("console.log*"))
    c.kill()


def ratio(key: dict[str, list[float]]) -> float:
    return round(summary(key["confined"])["p50"] / summary(key["unconfined"])["p50"], 3)


emit({"benchmark": "confinement", "accelerator": "tcg",
      "confinement": confinement().mode,
      "qemu_start_to_qmp_ms": {m: summary(v) for m, v in start.items()},
      "cold_boot_ms": {m: summary(v) for m, v in boot.items()},
      "restore_to_ready_ms": {m: summary(v) for m, v in restore.items()},
      "live_snapshot_pause_ms": {m: summary(v) for m, v in pause.items()},
      "confined_over_unconfined_p50": {"qemu_start_to_qmp": ratio(start),
                                       "cold_boot": ratio(boot),
                                       "restore_to_ready": ratio(restore),
                                       "live_snapshot_pause": ratio(pause)},
      "console_flood": {"guest_wrote_mib": flood_mib, "seconds": round(flood_s, 1),
                        "host_kept_bytes": kept, "cap_bytes": jail.CONSOLE_CAP}})
