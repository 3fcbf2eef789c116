"""Runtime: journal overhead per operation (an intent + its result, synchronous WAL
writes); what a restarting manager's ``recover`` costs with N live managed sandboxes;
and the time it takes to recover them once they are orphaned (their keepers
SIGKILLed; N from RECOVER_N, default 20)."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

from _util import emit, summary

N = int(os.environ.get("RECOVER_N", "20"))
OPS = 500

with tempfile.TemporaryDirectory() as tmp:
    os.environ["SANDVM_JOURNAL"] = str(Path(tmp) / "journal.db")
    from sandvm.runtime.journal import Journal
    from sandvm.runtime.manager import SandboxManager

    j = Journal()
    j.add("sb-bench", state="running")
    per_op = []
    for _ in range(OPS):
        t0 = time.monotonic()
        j.result(j.intent("sb-bench", "exec", argv_len=3), ok=True)
        per_op.append(time.monotonic() - t0)
    j.end("sb-bench", "benchmark row")

    m = SandboxManager()

    async def make(n: int) -> list[str]:
        ids: list[str] = []
        while len(ids) < n:
            batch = await asyncio.gather(*(m.create(ttl=600) for _ in range(min(4, n - len(ids)))))
            for sb in batch:
                await m.detach(sb)
                ids.append(sb.sandbox_id)
        return ids

    t0 = time.monotonic()
    ids = asyncio.run(make(N))
    started = time.monotonic() - t0
    t0 = time.monotonic()
    live = asyncio.run(SandboxManager().recover())  # a manager restarting: all is well
    recover_live = time.monotonic() - t0
    assert len(live.live) == N and not live.repaired
    recs = [m.journal.get(i) for i in ids]
    for r in recs:
        assert r is not None and r.keeper_pid is not None
        os.kill(r.keeper_pid, signal.SIGKILL)
    time.sleep(0.5)
    t0 = time.monotonic()
    rec = asyncio.run(SandboxManager().recover())
    recover = time.monotonic() - t0
    repaired = rec.repaired
    leftovers = [r.rundir for r in recs if r is not None and r.rundir and Path(r.rundir).exists()]

emit({"benchmark": "runtime", "accelerator": "tcg",
      "journal_intent_plus_result_ms": summary(per_op),
      "orphans": N, "seconds_to_start_them": round(started, 1),
      "recover_with_all_live_s": round(recover_live, 3),
      "recover_orphans_s": round(recover, 3), "repaired": len(repaired),
      "runtime_dirs_left": len(leftovers)})
