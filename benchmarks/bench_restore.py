"""Restore from a snapshot to agent-ready (target under TCG: p50 <= 150 ms), and
snapshot save times (stopped VM: target <= 50 ms; live pause: target <= 100 ms)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _util import emit, summary

from sandvm import Sandbox
from sandvm.snapshots import SnapshotStore

RESTORES = 20

with tempfile.TemporaryDirectory() as tmp:
    store = SnapshotStore(Path(tmp))
    live_pause, live_total, stop_pause, stop_total = [], [], [], []
    for i in range(3):
        sb = Sandbox.create()
        sb.commands.run("python3 -c 'import json'")
        sb.snapshot(f"live{i}", store=store)
        live_pause.append(sb.last_snapshot_times["pause_s"])
        live_total.append(sb.last_snapshot_times["total_s"])
        snap = sb.snapshot(f"stop{i}", stop=True, store=store)
        stop_pause.append(sb.last_snapshot_times["pause_s"])
        stop_total.append(sb.last_snapshot_times["total_s"])
    # a diff snapshot after a small change, against a full one of the same VM
    sb = Sandbox.create()
    full = sb.snapshot("full", store=store)
    sb.files.write("/root/change.bin", b"x" * (1 << 20))
    t0 = time.monotonic()
    diff = sb.snapshot("diff", store=store, parent=full)
    diff_total = time.monotonic() - t0
    sb.kill()
    diff_stats = {"full_on_disk_mib": round(full.size_bytes / 2**20, 1),
                  "diff_on_disk_mib": round(diff.size_bytes / 2**20, 1),
                  "diff_snapshot_total_ms": round(diff_total * 1000, 1)}
    t0 = time.monotonic()
    Sandbox.from_snapshot(diff, store=store).kill()
    diff_stats["first_restore_of_diff_ms"] = round((time.monotonic() - t0) * 1000, 1)
    Sandbox.from_snapshot(snap, store=store).kill()  # first use verifies the RAM file
    restore = []
    first_cmd = []
    for _ in range(RESTORES):
        t0 = time.monotonic()
        c = Sandbox.from_snapshot(snap, store=store)
        restore.append(time.monotonic() - t0)
        t0 = time.monotonic()
        c.commands.run(["true"])
        first_cmd.append(time.monotonic() - t0)
        c.kill()
    on_disk_mib = round(snap.size_bytes / 2**20, 1)

emit({"benchmark": "snapshot_restore", "accelerator": "tcg",
      "restore_to_ready_ms": summary(restore), "first_command_after_restore_ms":
      summary(first_cmd), "target_restore_p50_ms": 150,
      "live_snapshot_pause_ms": summary(live_pause), "live_snapshot_total_ms":
      summary(live_total), "target_live_pause_ms": 100,
      "stopped_snapshot_vm_frozen_ms": summary(stop_pause),
      "stopped_snapshot_committed_ms": summary(stop_total), "target_stopped_save_ms": 50,
      "snapshot_on_disk_mib": on_disk_mib, "diff_snapshot": diff_stats})
