"""The load test of the HTTP API (bounded, loopback only): 20 clients at once, each
taking a sandbox from a warm pool over HTTP and running 50 commands in it, every
output checked. Zero errors allowed; the latency figures are printed (the benchmark
benchmarks/bench_server_load.py records them as JSON).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandvm.client import Pool, Sandbox
from test_server import ServerProc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_server_load import run_load

pytestmark = pytest.mark.qemu
CLIENTS, COMMANDS = 20, 50


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(tmp_path_factory.mktemp("server"), max_sandboxes=CLIENTS + 2,
                     extra=("--max-pool-size", str(CLIENTS + 2)))
    srv.alice = srv.key("load")
    with srv.running():
        yield srv


def test_twenty_clients_fifty_commands_each(server: ServerProc) -> None:
    src = Sandbox.create(api_key=server.alice, url=server.url, timeout=600)
    src.files.write("/root/marker", "x")
    src.snapshot("load")
    src.kill()
    with Pool.create(name="load", snapshot="load", min_size=CLIENTS, max_size=CLIENTS + 2,
                     api_key=server.alice, url=server.url) as pool:
        deadline = time.monotonic() + 300
        while pool.stats().ready < CLIENTS:
            assert time.monotonic() < deadline, pool.stats()
            time.sleep(0.2)
        res = asyncio.run(run_load(server.url, server.alice, "load", clients=CLIENTS,
                                   commands=COMMANDS))
        print(json.dumps(res))
        assert res["errors"] == []
        assert res["command_ms"]["n"] == CLIENTS * COMMANDS
        assert res["acquire_ms"]["n"] == CLIENTS
        st = pool.stats()
        assert st.hits + st.misses == CLIENTS and st.timeouts == 0
    assert Sandbox.list(api_key=server.alice, url=server.url) == []  # each client killed its own
