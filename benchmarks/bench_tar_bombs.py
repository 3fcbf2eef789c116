"""Tar bombs in headers: how fast, and in how little memory, sandvm refuses them, against
what Python's tarfile alone does with the same bytes.

Inputs (built once, written gzipped to a temp dir):
- a layer with one GNU sparse member whose map has 1,000,000 (offset, size) pairs, in the
  two flavours whose map has no size limit of its own: old GNU (type ``S`` with extended
  header blocks) and PAX 1.0 (the map at the start of the member's data);
- an image archive (``sandvm image load`` input) whose one member carries a 32 MiB PAX
  ``comment``.

Each (input, reader) pair runs in a fresh child process, twice: once plain (wall time to
refusal, and ru_maxrss growth over the child's own start), once under tracemalloc (peak
Python heap). The child has a 4 GiB address-space limit and 300 s: what tarfile alone does
is measured in full when it fits, else reported as not finished.

    .venv/bin/python benchmarks/bench_tar_bombs.py    # SPARSE_ENTRIES=... to vary the map
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ENTRIES = int(os.environ.get("SPARSE_ENTRIES", "1000000"))
COMMENT_BYTES = 32 << 20
CHILD_TIMEOUT = 300.0
CHILD_AS_LIMIT = 4 << 30


def child(kind: str, reader: str, path: str, traced: bool) -> None:
    """Read ``path`` with ``reader`` (sandvm or tarfile); print one JSON line."""
    import tarfile
    import tracemalloc

    from sandvm.errors import SandvmError
    from sandvm.images.blobs import BlobStore
    from sandvm.images.layers import apply_layers
    from sandvm.images.model import OCI_LAYER_GZIP, LayerRef
    from sandvm.images.oci import import_archive

    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work = Path(path).parent / f"work-{os.getpid()}"
    blobs = BlobStore(work / "blobs")
    ref = None
    if reader == "sandvm" and kind != "archive":
        data = Path(path).read_bytes()
        ref = LayerRef(blobs.put_bytes(data), OCI_LAYER_GZIP, len(data))
        del data
        (work / "root").mkdir()
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    outcome = "read"
    try:
        if reader == "sandvm" and ref is not None:
            apply_layers(blobs, [ref], work / "root")
        elif reader == "sandvm":
            import_archive(Path(path), blobs)
        elif kind == "archive":
            with tarfile.open(path, "r:*") as tf:
                tf.getmembers()
        else:
            with gzip.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
                for ti in tf:
                    outcome = f"read: a member with a {len(ti.sparse or [])}-entry sparse map"
    except SandvmError as exc:
        outcome = f"refused: {type(exc).__name__}: ...{exc.message[-110:]}"
    except MemoryError:
        outcome = "MemoryError (4 GiB address-space limit)"
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] if traced else None
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "maxrss_growth_kib": grown,
                      "outcome": outcome}))


def limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_AS_LIMIT, CHILD_AS_LIMIT))


def run(kind: str, reader: str, path: Path, *, traced: bool) -> dict[str, object]:
    argv = [sys.executable, __file__, "--child", kind, reader, str(path), str(int(traced))]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                             preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"outcome": f"not finished in {CHILD_TIMEOUT:.0f} s"}
    if res.returncode != 0:
        return {"outcome": f"child failed ({res.returncode}): {res.stderr.strip()[-200:]}"}
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def measure(kind: str, reader: str, path: Path) -> dict[str, object]:
    plain = run(kind, reader, path, traced=False)
    traced = run(kind, reader, path, traced=True)
    return {"outcome": plain["outcome"],
            "ms": round(float(plain["seconds"]) * 1000, 3) if "seconds" in plain else None,
            "maxrss_growth_mib": round(int(plain["maxrss_growth_kib"]) / 1024, 1)
            if "maxrss_growth_kib" in plain else None,
            "tracemalloc_peak_mib": round(int(traced["peak_bytes"]) / (1 << 20), 2)
            if traced.get("peak_bytes") is not None else None,
            "ms_traced": round(float(traced["seconds"]) * 1000, 3)
            if "seconds" in traced else None}


def ratio(a: object, b: object) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 1)
    return None


def main() -> None:
    from _util import emit

    from oci_build import pax_comment_tar, sparse_tar

    results: dict[str, object] = {"sparse_entries": ENTRIES, "comment_bytes": COMMENT_BYTES}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {f"sparse-{f}": gzip.compress(sparse_tar(f, ENTRIES), mtime=0)
                  for f in ("gnu-old", "pax-1.0")}
        inputs["archive"] = gzip.compress(pax_comment_tar(COMMENT_BYTES), mtime=0)
        for name, data in inputs.items():
            path = Path(tmp) / f"{name}.tar.gz"
            path.write_bytes(data)
            kind = "archive" if name == "archive" else "layer"
            ours, stdlib = measure(kind, "sandvm", path), measure(kind, "tarfile", path)
            results[name] = {
                "input_bytes": len(data), "sandvm": ours, "tarfile_alone": stdlib,
                "time_ratio_tarfile_over_sandvm": ratio(stdlib["ms"], ours["ms"]),
                "heap_ratio_tarfile_over_sandvm": ratio(stdlib["tracemalloc_peak_mib"],
                                                        ours["tracemalloc_peak_mib"]),
            }
    emit(results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1")
    else:
        main()
