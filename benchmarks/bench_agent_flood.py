"""Host memory while a hostile guest floods EVENT frames at a stream the host is not reading.

The guest is a fake: a separate process serving the agent socket (as QEMU's chardev
does) and speaking the real wire protocol; the host is the real AgentConnection in this
process. The guest says HELLO, waits for the host's OPEN, then sends EVENT frames of
nested ``{"e":[{},{},...]}`` as fast as the host takes them, on stream 1, which the host
never reads. When the host fails the connection the guest serves the next one: the
flood goes on for ``--duration`` seconds per run, so the figures also show that the
failed connections leave nothing behind.

Runs: ``max_frames`` (256 KiB frames, ~6 MB decoded each: refused one by one by the
per-message decoded cap), ``under_cap_frames`` (the largest frames under that cap, so
the per-stream byte bound is what fails the connection) and, for comparison,
``count_only`` (the same under-cap flood with every byte cap set huge, i.e. only the
old 4096-items-per-stream bound; stopped at ``--ceiling-mib`` of RSS so that it cannot
take the machine down). RSS is the host process's VmRSS sampled every 50 ms; the
tracemalloc peak (Python allocations only) comes from a shorter pass of each run
with tracemalloc on (``--trace-seconds``), since tracing slows the decoding many times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from _util import emit

from sandvm import agent_client, wire
from sandvm.agent_client import AgentConnection
from sandvm.errors import SandvmError

GUEST = r"""
import socket, sys
from sandvm import wire

path, n = sys.argv[1], int(sys.argv[2])
frame = wire.encode(wire.EVENT, 1, b'{"e":[' + b",".join([b"{}"] * n) + b"]}")
hello = wire.encode_json(wire.HELLO, 0, wire.hello_payload(
    "agent", agent_version="flood", boot_id="b", kernel="k"))
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1)
print(len(frame), flush=True)
while True:
    conn, _ = srv.accept()
    try:
        conn.sendall(hello)
        dec = wire.FrameDecoder()
        opened = False
        while not opened:
            data = conn.recv(1 << 16)
            if not data:
                break
            opened = any(t == wire.OPEN for t, _, _ in dec.feed(data))
        while opened:
            conn.sendall(frame)
    except OSError:
        pass
    conn.close()
"""


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _why(exc: SandvmError) -> str:
    return str(exc)[:90]


async def flood_run(name: str, dicts: int, *, duration: float, ceiling_mib: float,
                    caps: tuple[int, int, int] | None, trace: bool) -> dict[str, Any]:
    saved = (agent_client.MAX_QUEUED_BYTES, agent_client.MAX_CONN_QUEUED_BYTES,
             agent_client.MAX_MESSAGE_BYTES)
    if caps is not None:
        (agent_client.MAX_QUEUED_BYTES, agent_client.MAX_CONN_QUEUED_BYTES,
         agent_client.MAX_MESSAGE_BYTES) = caps
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "agent.sock")
        guest = subprocess.Popen([sys.executable, "-c", GUEST, path, str(dicts)],
                                 stdout=subprocess.PIPE, text=True)
        assert guest.stdout is not None
        frame_bytes = int(guest.stdout.readline())
        if trace:
            tracemalloc.start()
        base = rss_mib()
        peak = base
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        connections = 0
        failures: dict[str, int] = {}
        ceiling_hit_s: float | None = None
        frames_queued_max = 0
        try:
            while loop.time() - t0 < duration and ceiling_hit_s is None:
                conn = await AgentConnection.connect(path, timeout=10)
                connections += 1
                try:
                    await conn.handshake(timeout=10)
                    st = await conn.open({"op": "exec", "argv": ["x"]})  # never read
                    while conn.failure is None and loop.time() - t0 < duration:
                        await asyncio.sleep(0.05)
                        peak = max(peak, rss_mib())
                        frames_queued_max = max(frames_queued_max, len(st._items))
                        if peak - base > ceiling_mib:
                            ceiling_hit_s = loop.time() - t0
                            break
                    if conn.failure is not None:
                        why = _why(conn.failure)
                        failures[why] = failures.get(why, 0) + 1
                except SandvmError as exc:
                    failures[_why(exc)] = failures.get(_why(exc), 0) + 1
                finally:
                    await conn.close()
                    del conn
                peak = max(peak, rss_mib())
            elapsed = loop.time() - t0
        finally:
            guest.kill()
            guest.wait()
            (agent_client.MAX_QUEUED_BYTES, agent_client.MAX_CONN_QUEUED_BYTES,
             agent_client.MAX_MESSAGE_BYTES) = saved
            traced_peak = tracemalloc.get_traced_memory()[1] if trace else 0
            tracemalloc.stop()
    if trace:  # tracemalloc slows allocation-heavy decoding many times: its own pass
        return {"run": name, "seconds": round(elapsed, 1), "connections": connections,
                "connections_failed": sum(failures.values()),
                "tracemalloc_peak_mib": round(traced_peak / (1 << 20), 1)}
    return {
        "run": name,
        "frame_bytes": frame_bytes,
        "seconds": round(elapsed, 1),
        "connections_failed": sum(failures.values()),
        "connections": connections,
        "failures": failures,
        "rss_base_mib": round(base, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_growth_mib": round(peak - base, 1),
        "items_queued_max": frames_queued_max,
        "stopped_at_ceiling_after_s": round(ceiling_hit_s, 1) if ceiling_hit_s else None,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--ceiling-mib", type=float, default=1024.0,
                    help="RSS growth at which the count-only run is stopped")
    ap.add_argument("--trace-seconds", type=float, default=10.0,
                    help="length of each run's tracemalloc pass (0: none)")
    ap.add_argument("--skip-count-only", action="store_true")
    args = ap.parse_args()
    # the largest {"e":[{},...]} whose decoded size stays under the per-message cap
    per_dict = wire.json_footprint({"e": [{}] * 1000}, limit=1 << 30) / 1000
    under_cap = int(wire.MAX_DECODED / per_dict * 0.95)
    max_dicts = (wire.MAX_JSON - 16) // 3
    huge = 1 << 62
    plan: list[tuple[str, int, tuple[int, int, int] | None]] = [
        ("max_frames", max_dicts, None), ("under_cap_frames", under_cap, None)]
    if not args.skip_count_only:
        plan.append(("count_only", under_cap, (huge, huge, huge)))
    runs = []
    for name, dicts, caps in plan:
        run = await flood_run(name, dicts, duration=args.duration,
                              ceiling_mib=args.ceiling_mib, caps=caps, trace=False)
        if args.trace_seconds > 0:
            traced = await flood_run(name, dicts, duration=args.trace_seconds,
                                     ceiling_mib=args.ceiling_mib, caps=caps, trace=True)
            run["tracemalloc_pass"] = traced
        runs.append(run)
    bounded = max(r["rss_growth_mib"] for r in runs[:2])
    out: dict[str, Any] = {
        "benchmark": "agent_event_flood",
        "guest": "fake guest process over a unix socket driving the real AgentConnection"
                 " (no VM)",
        "caps": {"per_stream_mib": agent_client.MAX_QUEUED_BYTES >> 20,
                 "per_connection_mib": agent_client.MAX_CONN_QUEUED_BYTES >> 20,
                 "per_message_mib": agent_client.MAX_MESSAGE_BYTES >> 20,
                 "items_per_stream": agent_client.MAX_QUEUED_ITEMS},
        "runs": runs,
        "pid": os.getpid(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if len(runs) == 3:
        old = runs[2]
        out["count_only_over_bounded_rss_growth"] = round(
            old["rss_growth_mib"] / max(bounded, 1.0), 1)
        if old["stopped_at_ceiling_after_s"]:
            out["note"] = ("the count-only run was stopped at the RSS ceiling; unbounded it"
                           " would go on to 4096 items x the decoded size per stream")
    emit(out)


if __name__ == "__main__":
    asyncio.run(main())
