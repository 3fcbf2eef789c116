"""commands.run("true") round trip on a running VM (target p50 <= 20 ms), next to the bare
agent channel round trip (ping) that bounds it from below."""

from __future__ import annotations

import time

from _util import emit, summary

from sandvm import Sandbox

N = 200

with Sandbox.create() as sb:
    for _ in range(10):  # warm up
        sb.commands.run("true")
    runs = []
    for _ in range(N):
        t0 = time.monotonic()
        sb.commands.run(["true"])
        runs.append(time.monotonic() - t0)
    shell = []
    for _ in range(N // 4):
        t0 = time.monotonic()
        sb.commands.run("true")
        shell.append(time.monotonic() - t0)
    pings = [sb.ping() for _ in range(N)]
    accel = sb.info["accelerator"]

emit({"benchmark": "exec_round_trip", "accelerator": accel,
      "argv_true_ms": summary(runs), "shell_true_ms": summary(shell),
      "agent_ping_ms": summary(pings), "target_p50_ms": 20})
