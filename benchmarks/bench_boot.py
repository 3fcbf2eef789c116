"""Cold boot to agent-ready (target under TCG here: <= 4 s)."""

from __future__ import annotations

import time

from _util import emit, summary

from sandvm import Sandbox

RUNS = 5

times = []
boot_only = []
accel = None
for _ in range(RUNS):
    t0 = time.monotonic()
    sb = Sandbox.create()
    times.append(time.monotonic() - t0)
    boot_only.append(sb.info["boot_seconds"])
    accel = sb.info["accelerator"]
    sb.kill()

emit({"benchmark": "cold_boot_to_agent_ready", "accelerator": accel,
      "create_ms": summary(times), "boot_ms": summary(boot_only), "target_ms": 4000})
