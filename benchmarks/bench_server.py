"""Server and remote SDK: `commands.run("true")` over HTTP against the local API, sandbox
creation over HTTP against a local managed create (both cold boots: the server's
sandboxes are managed ones), and file throughput over HTTP against local.

A `sandvm serve` subprocess on 127.0.0.1 with a private state dir and journal.
N commands from SERVER_N (default 300), creations from CREATE_N (default 4).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time

from _util import emit, serve, summary

N = int(os.environ.get("SERVER_N", "300"))
CREATES = int(os.environ.get("CREATE_N", "4"))
FILE_MB = 64


def timed(fn: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def throughput(fn: object, nbytes: int, rounds: int = 3) -> float:
    """Best of ``rounds``, MB/s."""
    best = min(timed(fn, rounds))
    return round(nbytes / best / 1e6, 1)


with serve() as (url, key, _tmp):
    from sandvm import Sandbox as LocalSandbox
    from sandvm.client import Sandbox
    from sandvm.runtime.manager import SandboxManager

    # ---- commands.run("true")
    local = LocalSandbox.create(memory_mib=512)
    remote = Sandbox.create(api_key=key, url=url, timeout=3600, memory_mib=512)
    for sb in (local, remote):
        for _ in range(20):  # warm up: TCG translation, connections
            sb.commands.run("true")
    local_true = timed(lambda: local.commands.run(["true"]), N)
    remote_true = timed(lambda: remote.commands.run(["true"]), N)

    # ---- files
    data = secrets.token_bytes(FILE_MB << 20)
    up_local = throughput(lambda: local.files.write("/tmp/f", data), len(data))
    up_remote = throughput(lambda: remote.files.write("/tmp/f", data), len(data))
    down_local = throughput(lambda: local.files.read("/tmp/f", format="bytes",
                                                     max_bytes=len(data)), len(data))
    down_remote = throughput(lambda: remote.files.read("/tmp/f", format="bytes",
                                                       max_bytes=len(data)), len(data))
    small = secrets.token_bytes(4096)
    up_small_remote = timed(lambda: remote.files.write("/tmp/s", small), 50)
    local.kill()
    remote.kill()

    # ---- create (cold boots; one at a time)
    m = SandboxManager()

    async def managed() -> float:
        t0 = time.perf_counter()
        sb = await m.create(ttl=120)
        dt = time.perf_counter() - t0
        await sb.kill()
        await m.kill(sb.sandbox_id)
        return dt

    create_http = []
    for _ in range(CREATES):
        t0 = time.perf_counter()
        sb = Sandbox.create(api_key=key, url=url)
        create_http.append(time.perf_counter() - t0)
        sb.kill()
    create_local = [asyncio.run(managed()) for _ in range(CREATES)]

emit({
    "commands_run_true_ms": {"local": summary(local_true), "http": summary(remote_true)},
    "http_overhead_p50_ms": round((summary(remote_true)["p50"]
                                   - summary(local_true)["p50"]), 3),
    "create_ms": {"http": summary(create_http), "local_managed": summary(create_local)},
    "files_MBps": {"size_MiB": FILE_MB,
                   "upload_http": up_remote, "upload_local": up_local,
                   "download_http": down_remote, "download_local": down_local},
    "upload_4KiB_http_ms": summary(up_small_remote),
})
