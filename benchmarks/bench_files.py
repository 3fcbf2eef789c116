"""files.write / files.read throughput for 1 MiB and 64 MiB (target >= 40 MB/s)."""

from __future__ import annotations

import os
import time

from _util import emit

from sandvm import Sandbox

results = {}
with Sandbox.create(memory_mib=512) as sb:
    for label, size, reps in (("1MiB", 1 << 20, 10), ("64MiB", 64 << 20, 2)):
        data = os.urandom(size)
        w, r = [], []
        for _ in range(reps):
            t0 = time.monotonic()
            sb.files.write("/tmp/bench.bin", data)
            w.append(time.monotonic() - t0)
            t0 = time.monotonic()
            back = sb.files.read("/tmp/bench.bin", format="bytes", max_bytes=size)
            r.append(time.monotonic() - t0)
            assert back == data
        results[label] = {
            "write_MBps": round(size / min(w) / 1e6, 1),
            "read_MBps": round(size / min(r) / 1e6, 1),
            "write_MBps_median": round(size / sorted(w)[len(w) // 2] / 1e6, 1),
            "read_MBps_median": round(size / sorted(r)[len(r) // 2] / 1e6, 1),
        }
        sb.files.remove("/tmp/bench.bin")
    accel = sb.info["accelerator"]

emit({"benchmark": "file_throughput", "accelerator": accel, **results, "target_MBps": 40})
