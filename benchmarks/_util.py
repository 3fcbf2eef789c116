"""Shared helpers for the benchmark scripts (each prints one JSON object)."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def summary(values: list[float], unit_scale: float = 1000.0) -> dict[str, float]:
    """p50/p90/p99/min/max/mean of seconds, in milliseconds by default."""
    return {
        "n": len(values),
        "p50": round(pct(values, 50) * unit_scale, 3),
        "p90": round(pct(values, 90) * unit_scale, 3),
        "p99": round(pct(values, 99) * unit_scale, 3),
        "min": round(min(values) * unit_scale, 3),
        "max": round(max(values) * unit_scale, 3),
        "mean": round(statistics.fmean(values) * unit_scale, 3),
    }


def emit(obj: dict[str, Any]) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


@contextmanager
def serve(*options: str) -> Iterator[tuple[str, str, str]]:
    """A `sandvm serve` subprocess on 127.0.0.1 with a private state dir and journal
    (``options``: more serve flags); yields (its URL, an API key, the temp dir). At the
    end it is stopped and every sandbox left in its journal is killed."""
    import asyncio
    import os
    import signal
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    import httpx

    sandvm = str(Path(sys.executable).parent / "sandvm")
    os.environ.setdefault("SANDVM_DEFAULT_IMAGE", "base")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SANDVM_SERVER_DIR": f"{tmp}/state",
               "SANDVM_JOURNAL": f"{tmp}/journal.db"}
        os.environ["SANDVM_JOURNAL"] = env["SANDVM_JOURNAL"]  # local managed sandboxes too
        key = subprocess.run([sandvm, "key", "create", "bench"], env=env, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen([sandvm, "serve", "--port", "0", "--log-level",
                                       "warning", *options],
                                      env=env, stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL)
        try:
            url = ""
            for _ in range(300):
                text = log_path.read_text()
                if "serving on http://127.0.0.1:" in text:
                    port = int(text.split("serving on http://127.0.0.1:")[1].split()[0])
                    url = f"http://127.0.0.1:{port}"
                    try:
                        if httpx.get(f"{url}/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                time.sleep(0.1)
            else:
                raise RuntimeError(f"the server did not start: {log_path.read_text()}")
            yield url, key, tmp
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
            from sandvm.runtime.manager import SandboxManager

            left = SandboxManager()  # the server detached what it held: kill what is left
            for info in left.ls():
                asyncio.run(left.kill(info.sandbox_id))
            left.journal.close()
