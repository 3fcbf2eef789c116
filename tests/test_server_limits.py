"""Tenants' memory quota and rate limits of `sandvm serve`.

Pure parts first (the token bucket on a fake clock, the store's quota transaction under
threads, the settings); then one live server for the module: each tenant may hold
640 MiB of sandboxes and send 5 requests per second in bursts of 10. Tenants: ``mem``
(the memory quota), ``rl`` (the rate limit), ``other`` (unaffected by both).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sandvm import ConfigError, QuotaExceeded, RateLimited
from sandvm.client import Sandbox
from sandvm.errors import error_from_dict
from sandvm.server.ratelimit import RateLimiter, limiter_for, retry_after_seconds
from test_server import ServerProc, _auth

MEMORY_CAP = 640
RATE, BURST = 5, 10
KEYS: dict[str, str] = {}  # API keys of the live server's tenants


# ---------------------------------------------------------------------------- pure


def test_token_bucket_on_a_fake_clock() -> None:
    now = [100.0]
    rl = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    wait = rl.take("a")
    assert wait == pytest.approx(0.5)  # one token comes every 1/2 s
    assert rl.take("b") == 0.0  # tenants have their own buckets
    now[0] += 0.5
    assert rl.take("a") == 0.0 and rl.take("a") > 0
    now[0] += 60  # refilled, never beyond the burst
    assert [rl.take("a") for _ in range(4)][-1] > 0
    exc = rl.error(0.2)
    assert isinstance(exc, RateLimited) and isinstance(exc, QuotaExceeded)
    assert exc.code == "rate_limited" and exc.retry_after == 1.0 and "retry in 1 s" in str(exc)
    assert [retry_after_seconds(w) for w in (0.01, 1.0, 1.2)] == [1, 1, 2]


def test_full_buckets_are_forgotten() -> None:
    now = [0.0]
    rl = RateLimiter(1000.0, 1, clock=lambda: now[0])
    for i in range(3000):
        rl.take(f"t{i}")
        now[0] += 0.01
    assert len(rl._buckets) < 1100  # memory stays bounded by the sweep


def test_settings_refuse_nonsense(tmp_path: Path) -> None:
    from sandvm.server import ServerConfig

    assert limiter_for(None, None) is None
    assert limiter_for(2.5, None).burst == 3  # type: ignore[union-attr]  # one second's worth
    for bad in ({"rate_limit": 0}, {"rate_limit": -1.0}, {"rate_limit": 1, "rate_burst": 0},
                {"rate_burst": 5}, {"max_tenant_memory_mib": 0},
                {"max_tenant_memory_mib": True}, {"max_tenant_ports": -1},
                {"port_host": "example.com"}, {"max_snapshot_bytes": 0},
                {"max_snapshot_bytes": True}, {"max_snapshot_bytes": 1.5}):
        with pytest.raises(ConfigError):
            ServerConfig(state_dir=tmp_path, **bad)  # type: ignore[arg-type]
    assert ServerConfig(state_dir=tmp_path, port_host="localhost").port_host == "127.0.0.1"


def test_rate_limited_errors_come_back_with_retry_after() -> None:
    exc = error_from_dict({"code": "rate_limited", "message": "slow down"})
    assert type(exc) is RateLimited and exc.retry_after is None

    def handle(req: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "3"},
                              json={"code": "rate_limited", "message": "slow down"})

    with pytest.raises(RateLimited) as ei:
        Sandbox.list(api_key="sandvm_k", url="http://sv", transport=httpx.MockTransport(handle))
    assert ei.value.retry_after == 3.0 and ei.value.message == "slow down"
    from sandvm.client._http import _retry_after

    assert [_retry_after(v) for v in (None, "x", "nan", "-1", "2.5")] == [
        None, None, None, None, 2.5]


def test_memory_reservations_are_atomic_under_threads(tmp_path: Path) -> None:
    from sandvm.server import ServerStore

    stores = [ServerStore(tmp_path / "state") for _ in range(8)]  # 8 connections
    barrier = threading.Barrier(8)

    def one(i: int) -> str | None:
        barrier.wait()
        return stores[i].reserve_within(f"sb-{i:010d}", "t", limit=100, memory_mib=300,
                                        max_memory_mib=1000)

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    assert results.count(None) == 3 and results.count("memory") == 5
    assert stores[0].memory_in_use("t") == 900
    assert stores[0].reserve_within("sb-x", "t", limit=100, memory_mib=100,
                                    max_memory_mib=1000) is None
    assert stores[0].reserve_within("sb-y", "t", limit=100, memory_mib=1,
                                    max_memory_mib=1000, memory_elsewhere=0) == "memory"
    assert stores[0].reserve_within("sb-z", "u", limit=100, memory_mib=1000,
                                    max_memory_mib=1000) is None  # another tenant's own
    for st in stores:
        st.close()


def test_older_databases_get_the_memory_column(tmp_path: Path) -> None:
    import sqlite3

    from sandvm.server import ServerStore

    (tmp_path / "state").mkdir(mode=0o700)
    db = sqlite3.connect(tmp_path / "state" / "server.db")
    db.executescript("CREATE TABLE sandboxes (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
                     " created REAL NOT NULL, ended REAL);"
                     "INSERT INTO sandboxes VALUES ('sb-old', 't', 1.0, NULL);")
    db.close()
    st = ServerStore(tmp_path / "state")
    assert st.memory_in_use("t") == 0 and st.owned("t") == ["sb-old"]
    st.close()


# ---------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(tmp_path_factory.mktemp("limits"), max_sandboxes=4,
                     extra=("--max-tenant-memory", str(MEMORY_CAP), "--rate-limit",
                            str(RATE), "--rate-burst", str(BURST)))
    for t in ("mem", "rl", "other"):
        KEYS[t] = srv.key(t)
    with srv.running():
        yield srv


def _key(srv: ServerProc, tenant: str) -> str:
    return KEYS[tenant]


def _create(srv: ServerProc, tenant: str, memory_mib: int) -> Sandbox | QuotaExceeded:
    try:
        return Sandbox.create(api_key=_key(srv, tenant), url=srv.url, memory_mib=memory_mib,
                              timeout=300)
    except QuotaExceeded as exc:
        return exc


@pytest.mark.qemu
def test_memory_quota_holds_against_concurrent_creates(server: ServerProc) -> None:
    with ThreadPoolExecutor(3) as ex:  # 3 x 384 MiB at once, 640 allowed: one boots
        results = list(ex.map(lambda _: _create(server, "mem", 384), range(3)))
    boxes = [r for r in results if isinstance(r, Sandbox)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(boxes) == 1 and len(refused) == 2, results
    for exc in refused:
        assert type(exc) is QuotaExceeded and exc.code == "quota_exceeded"
        assert "memory quota of 640 MiB" in exc.message and "kill a sandbox" in exc.message
    r = httpx.post(server.url + "/v1/sandboxes", headers=_auth(_key(server, "mem")),
                   json={"memory_mib": 384})
    assert r.status_code == 429 and r.json()["code"] == "quota_exceeded"
    assert "retry-after" not in r.headers  # a quota, not a rate: waiting alone won't do
    # the quota is the tenant's: another one boots while mem holds 384 MiB
    other = _create(server, "other", 512)
    assert isinstance(other, Sandbox), other
    other.kill()
    # killing frees the memory
    boxes[0].kill()
    again = _create(server, "mem", 512)
    assert isinstance(again, Sandbox), again
    assert again.commands.run("echo ok").stdout == "ok\n"
    again.kill()


@pytest.mark.qemu
def test_rate_limit_429_retry_after_and_recovery(server: ServerProc) -> None:
    time.sleep(BURST / RATE)  # a full bucket, whatever ran before
    h = _auth(_key(server, "rl"))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        statuses = [c.get("/v1/sandboxes", headers=h) for _ in range(3 * BURST)]
        codes = [r.status_code for r in statuses]
        assert codes[:BURST] == [200] * BURST and 429 in codes, codes
        limited = next(r for r in statuses if r.status_code == 429)
        assert limited.json()["code"] == "rate_limited"
        assert "5 per second" in limited.json()["message"]
        assert int(limited.headers["retry-after"]) >= 1
        # other tenants and the public paths are not limited
        assert c.get("/v1/sandboxes", headers=_auth(_key(server, "other"))).status_code == 200
        assert all(c.get("/health").status_code == 200 for _ in range(3 * BURST))
        assert all(c.get("/health", headers=h).status_code == 200 for _ in range(BURST))
        assert c.get("/openapi.json", headers=h).status_code == 200
        # a bad key is refused as such (401), never counted against anyone's bucket
        assert c.get("/v1/sandboxes", headers=_auth("sandvm_nope")).status_code == 401
        # the client says how long to wait, and does not retry on its own. The bucket
        # refills at 5 per second: on a loaded machine a token may come back between
        # the last 429 and the client's request, so empty it again and retry a few times
        limited_exc: RateLimited | None = None
        for _ in range(5):
            while c.get("/v1/sandboxes", headers=h).status_code != 429:
                pass
            try:
                Sandbox.list(api_key=_key(server, "rl"), url=server.url)
            except RateLimited as exc:
                limited_exc = exc
                break
        assert limited_exc is not None, "the client never saw the server's 429"
        assert limited_exc.retry_after is not None and limited_exc.retry_after >= 1
        time.sleep(limited_exc.retry_after)
        assert c.get("/v1/sandboxes", headers=h).status_code == 200
        metrics = c.get("/metrics", headers=_auth(_key(server, "other"))).text
        line = next(x for x in metrics.splitlines()
                    if x.startswith("sandvm_rate_limited_total "))
        assert float(line.split()[1]) >= 2 * BURST
        assert 'route="/v1/sandboxes",status="429"' in metrics


@pytest.mark.qemu
def test_streams_are_not_cut_by_the_rate_limit(server: ServerProc) -> None:
    time.sleep(BURST / RATE)
    key = _key(server, "rl")
    sb = Sandbox.create(api_key=key, url=server.url, timeout=300)
    try:
        time.sleep(BURST / RATE)
        first = threading.Event()
        with ThreadPoolExecutor(1) as ex:
            running = ex.submit(sb.commands.run, "for i in $(seq 1 15); do echo $i;"
                                " sleep 0.2; done", on_stdout=lambda _: first.set())
            assert first.wait(60)
            with httpx.Client(base_url=server.url, timeout=30) as c:  # use up the bucket
                codes = [c.get("/v1/sandboxes", headers=_auth(key)).status_code
                         for _ in range(2 * BURST)]
            assert 429 in codes
            result = running.result(60)  # the stream that started before went on
        assert result.stdout.split() == [str(i) for i in range(1, 16)]
    finally:
        time.sleep(BURST / RATE)
        sb.kill()
    r = httpx.get(server.url + "/v1/sandboxes", headers=_auth(key))
    assert r.status_code == 200 and json.loads(r.text) == {"sandboxes": []}
