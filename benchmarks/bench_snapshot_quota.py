"""What the server's per-tenant snapshot byte quota and its error boundary cost (no VM).

- ``bytes_used``: measuring a tenant's store (every file's blocks, hard links counted
  once) with 20 snapshots (the default --max-snapshots) and 4096 (its cap), each a
  state file, a sparse 1 MiB RAM file holding 8 KiB and a manifest.
- ``commit``: a save's commit into a store of 20 snapshots, with the byte cap (measure
  under the store's lock) and without, and their ratio.
- ``redact``: one error message through the API's error boundary (a 4 KiB console
  tail with paths and escapes), in microseconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from _util import emit, summary

from sandvm.errors import VmBootError
from sandvm.server.redact import Redactor
from sandvm.snapshots import SnapshotStore

MANIFEST = {"sandvm_version": "0", "qemu_version": "q", "machine": "microvm",
            "accelerator": "tcg", "cpu": "max", "kernel_release": "k", "created": 1.0,
            "source_id": "sb-x", "spec": {"image": "base", "memory_mib": 256, "vcpus": 1}}


def fill(store: SnapshotStore, name: str) -> None:
    staging = store.staging(name)
    (staging / "state").write_bytes(b"QEVM device state")
    with open(staging / "mem", "wb") as f:
        f.truncate(1 << 20)
        f.write(os.urandom(8192))
    store.commit(staging, name, dict(MANIFEST))


def timed(fn: object, n: int) -> list[float]:
    assert callable(fn)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


results: dict[str, object] = {}
with tempfile.TemporaryDirectory() as tmp:
    for count in (20, 4096):
        store = SnapshotStore(Path(tmp) / f"s{count}")
        for i in range(count):
            fill(store, f"snap-{i}")
        results[f"bytes_used_{count}_snapshots_ms"] = summary(
            timed(store.bytes_used, 20 if count < 1000 else 5))
    commits: dict[str, list[float]] = {"capped": [], "uncapped": []}
    for kind, cap in (("uncapped", None), ("capped", 1 << 40)) * 2:
        store = SnapshotStore(Path(tmp) / "s20", max_bytes=cap)
        for i in range(10):
            name = f"c-{kind}-{i}-{len(commits[kind])}"
            t0 = time.perf_counter()
            fill(store, name)
            commits[kind].append(time.perf_counter() - t0)
            store.remove(name)
    results["commit_ms"] = {k: summary(v) for k, v in commits.items()}
    results["commit_capped_over_uncapped_p50"] = round(
        summary(commits["capped"])["p50"] / summary(commits["uncapped"])["p50"], 2)

redactor = Redactor([Path(tempfile.gettempdir()) / "state"])
tail = "".join(f"[{i:5d}.000] /dev/shm/sandvm-0/sb-x/console.log \x1b[2J line\n"
               for i in range(80))[:4096]
exc = VmBootError(f"VM sb-x did not become ready within 60 s.\n{tail}")
results["redact_us"] = summary(timed(lambda: redactor.message(exc), 2000), 1e6)

emit({"benchmark": "snapshot_quota", **results})
