"""The egress proxy against real HTTP/HTTPS servers on loopback, one test per rule.

The proxy serves on a loopback TCP port here (in a sandbox it is reached over the
agent channel; test_network_vm.py covers that path). Test names resolve through a
resolver override; every address is in 127.0.0.0/8, so no test sends anything
anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from egress_servers import HalfCloseServer, HttpServer
from sandvm.egress import AuditLog, EgressEvent, EgressProxy, NetworkPolicy, proxy_env
from sandvm.errors import InvalidSpec

LOOP = ("127.0.0.0/8",)


@pytest.fixture(scope="module")
def http_server() -> Iterator[HttpServer]:
    with HttpServer("127.0.0.1", label="http-1") as s:
        yield s


def table(mapping: dict[str, list[str]], calls: list[str] | None = None
          ) -> Callable[[str, int], Any]:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in mapping:
            raise OSError(f"no such test host {host}")
        return list(mapping[host])
    return resolve


NAMES = {n: ["127.0.0.1"] for n in ("pypi.test", "files.pythonhosted.test", "a.example.test",
                                    "a.b.example.test", "example.test", "other.test")}


@asynccontextmanager
async def proxy(policy: NetworkPolicy, resolver: Any = None, audit: AuditLog | None = None
                ) -> AsyncIterator[tuple[EgressProxy, int]]:
    p = EgressProxy(policy, sandbox_id="sb-test", resolver=resolver or table(NAMES),
                    audit=audit)
    server = await p.serve_tcp()
    try:
        yield p, server.sockets[0].getsockname()[1]
    finally:
        await p.aclose()
        server.close()
        await server.wait_closed()


def client(port: int, cert: tuple[Path, Path]) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    return httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}", verify=ctx, timeout=10)


async def until_async(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``cond`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` to the proxy; the status, headers and body it answers."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().rstrip("\r\n").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    body = await r.readexactly(int(headers.get("Content-Length", "0")))
    w.close()
    return int(lines[0].split()[1]), headers, body


async def cut(r: asyncio.StreamReader) -> bool:
    """Whether the proxy ended this connection (EOF or reset) within 5 s."""
    try:
        return await asyncio.wait_for(r.read(), 5) == b""
    except ConnectionResetError:
        return True


def policy(**kw: Any) -> NetworkPolicy:
    kw.setdefault("allow_ips", LOOP)
    return NetworkPolicy(**kw)


# --------------------------------------------------------------------------- the rules


def test_allowed_host_over_https(https: HttpServer, cert: tuple[Path, Path]) -> None:
    async def go() -> None:
        audit = AuditLog()
        async with proxy(policy(allow=["pypi.test"], ports=[https.port]), audit=audit) as (
                p, port), client(port, cert) as c:
            r = await c.get(f"https://pypi.test:{https.port}/")
            assert (r.status_code, r.text) == (200, "hello from https-1\n")
            r = await c.get(f"https://pypi.test:{https.port}/bytes/300000")
            assert len(r.content) == 300000
        actions = [(e.action, e.host) for e in audit]
        assert ("allow", "pypi.test") in actions and ("close", "pypi.test") in actions
        closed = [e for e in audit if e.action == "close"]
        assert sum(e.bytes_in for e in closed) > 300000
        assert all(e.address == "127.0.0.1" for e in closed)
        assert p.active == 0
    asyncio.run(go())


def test_default_policy_denies_everything(https: HttpServer) -> None:
    async def go() -> None:
        async with proxy(NetworkPolicy()) as (_, port):
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{https.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 403
            assert "port" in headers["X-Sandvm-Reason"] or "allow list" in headers[
                "X-Sandvm-Reason"]
            status, headers, _ = await raw(port, b"CONNECT pypi.test:443 HTTP/1.1\r\n\r\n")
            assert status == 403
            assert headers["X-Sandvm-Reason"] == "pypi.test is not on this sandbox's allow list"
    asyncio.run(go())


def test_not_on_the_list_is_refused_with_a_reason(https: HttpServer,
                                                  cert: tuple[Path, Path]) -> None:
    async def go() -> None:
        audit = AuditLog()
        async with proxy(policy(allow=["pypi.test"], ports=[https.port]), audit=audit) as (
                _, port):
            async with client(port, cert) as c:
                with pytest.raises(httpx.ProxyError, match="403"):
                    await c.get(f"https://other.test:{https.port}/")
            status, headers, body = await raw(
                port, f"CONNECT other.test:{https.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 403
            assert headers["X-Sandvm-Reason"] == "other.test is not on this sandbox's allow list"
            assert b"not on this sandbox's allow list" in body
        denied = [e for e in audit if e.action == "deny"]
        assert denied and denied[0].host == "other.test" and "allow list" in denied[0].reason
    asyncio.run(go())


def test_wildcards(https: HttpServer, cert: tuple[Path, Path]) -> None:
    async def go() -> None:
        async with proxy(policy(allow=["*.example.test"], ports=[https.port])) as (
                _, port), client(port, cert) as c:
            for ok in ("a.example.test", "a.b.example.test"):
                r = await c.get(f"https://{ok}:{https.port}/")
                assert r.status_code == 200, ok
            with pytest.raises(httpx.ProxyError, match="403"):
                await c.get(f"https://example.test:{https.port}/")  # not the apex
    asyncio.run(go())


def test_ip_literals_are_refused(https: HttpServer) -> None:
    async def go() -> None:
        async with proxy(policy(allow=["pypi.test"], ports=[https.port])) as (_, port):
            for target in (f"127.0.0.1:{https.port}", f"[::1]:{https.port}"):
                status, headers, _ = await raw(
                    port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
                assert status == 403 and "IP literals are refused" in headers["X-Sandvm-Reason"]
    asyncio.run(go())
    with pytest.raises(InvalidSpec, match="IP literals are refused"):
        NetworkPolicy(allow=["10.0.0.1"])


def test_loopback_and_private_addresses_need_explicit_allowance(https: HttpServer) -> None:
    names = {"pypi.test": ["127.0.0.1"], "evil.test": ["10.1.2.3"],
             "meta.test": ["169.254.169.254"], "v6.test": ["::ffff:127.0.0.1"],
             "cgnat.test": ["100.64.0.1"]}

    async def go() -> None:
        strict = NetworkPolicy(allow=list(names), ports=[https.port])  # no allow_ips
        async with proxy(strict, table(names)) as (_, port):
            reasons = {}
            for host in names:
                status, headers, _ = await raw(
                    port, f"CONNECT {host}:{https.port} HTTP/1.1\r\n\r\n".encode())
                assert status == 403, host
                reasons[host] = headers["X-Sandvm-Reason"]
        assert "loopback address" in reasons["pypi.test"]
        assert "private address" in reasons["evil.test"]
        assert "cloud metadata" in reasons["meta.test"]
        assert "loopback" in reasons["v6.test"]  # IPv4-mapped IPv6 is seen through
        assert "non-public" in reasons["cgnat.test"] or "private" in reasons["cgnat.test"]
        assert all("allow_ips" in r for r in reasons.values())
        # allowing exactly one address opens exactly that one
        one = NetworkPolicy(allow=list(names), ports=[https.port], allow_ips=["127.0.0.1/32"])
        async with proxy(one, table(names)) as (_, port):
            status, _, _ = await raw(port, f"CONNECT pypi.test:{https.port} HTTP/1.1\r\n\r\n"
                                     .encode())
            assert status == 200
            status, _, _ = await raw(port, f"CONNECT evil.test:{https.port} HTTP/1.1\r\n\r\n"
                                     .encode())
            assert status == 403
    asyncio.run(go())


def test_dns_rebinding_cannot_move_the_connection(cert: tuple[Path, Path]) -> None:
    """The proxy resolves once, checks, and connects to the address it checked. A
    resolver that answers an allowed address first and a forbidden one after (or mixes
    them) never gets a connection to the forbidden one."""
    with HttpServer("127.0.0.2", tls=cert, label="allowed") as good, \
            HttpServer("127.0.0.3", tls=cert, label="forbidden"):
        answers = iter([["127.0.0.2"], ["127.0.0.3"], ["127.0.0.3"]])
        calls: list[str] = []

        async def rebinding(host: str, port: int) -> list[str]:
            calls.append(host)
            if host == "mixed.test":
                return ["127.0.0.3", "127.0.0.2"]
            return next(answers)

        async def go() -> None:
            pol = NetworkPolicy(allow=["rebind.test", "mixed.test"], ports=[good.port],
                                allow_ips=["127.0.0.2/32"])
            async with proxy(pol, rebinding) as (_, port):
                async with client(port, cert) as c:
                    r = await c.get(f"https://rebind.test:{good.port}/")
                    assert r.text == "hello from allowed\n"
                    assert calls == ["rebind.test"]  # resolved once for the connection
                async with client(port, cert) as c:  # a new connection: resolved anew
                    with pytest.raises(httpx.ProxyError, match="403"):  # now 127.0.0.3
                        await c.get(f"https://rebind.test:{good.port}/")
                status, _, _ = await raw(
                    port, f"CONNECT mixed.test:{good.port} HTTP/1.1\r\n"
                          f"Host: mixed.test\r\n\r\n".encode())
                assert status == 200  # only the checked address (127.0.0.2) is used
        asyncio.run(go())


def test_ports(https: HttpServer) -> None:
    async def go() -> None:
        async with proxy(policy(allow=["pypi.test"])) as (_, port):  # 443 only
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{https.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 403
            assert headers["X-Sandvm-Reason"] == f"port {https.port} is not allowed (allowed: 443)"
    asyncio.run(go())


def test_plain_http_only_when_allowed(http_server: HttpServer) -> None:
    url = f"http://pypi.test:{http_server.port}"

    async def go() -> None:
        async with proxy(policy(allow=["pypi.test"], ports=[http_server.port])) as (
                _, port), httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}") as c:
            r = await c.get(url + "/")
            assert r.status_code == 403
            assert "plain HTTP is not allowed" in r.headers["X-Sandvm-Reason"]
        pol = policy(allow=["pypi.test"], ports=[http_server.port], allow_http=True)
        async with proxy(pol) as (_, port):
            async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}") as c:
                r = await c.get(url + "/")
                assert (r.status_code, r.text) == (200, "hello from http-1\n")
                r = await c.get(url + "/headers", headers={"Proxy-Authorization": "Basic eA=="})
                seen = {k.lower(): v for k, v in json.loads(r.text).items()}
                assert "proxy-authorization" not in seen  # hop-by-hop: never forwarded
                assert seen["host"] == f"pypi.test:{http_server.port}"
                r = await c.post(url + "/echo", content=b"z" * 100_000)
                assert r.content == b"z" * 100_000
            # https:// as a plain request, and an origin-form request, are refused
            status, headers, _ = await raw(port, b"GET / HTTP/1.1\r\nHost: pypi.test\r\n\r\n")
            assert status == 400 and "absolute URL" in headers["X-Sandvm-Reason"]
    asyncio.run(go())


def test_byte_cap(https: HttpServer, cert: tuple[Path, Path]) -> None:
    async def go() -> None:
        audit = AuditLog()
        pol = policy(allow=["pypi.test"], ports=[https.port], max_bytes=200_000)
        async with proxy(pol, audit=audit) as (p, port):
            async with client(port, cert) as c:
                with pytest.raises(httpx.HTTPError):
                    await c.get(f"https://pypi.test:{https.port}/bytes/2000000")
            assert p.bytes_total <= 200_000 + 65536
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{https.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 403 and "byte cap" in headers["X-Sandvm-Reason"]
        assert any(e.action == "close" and "byte cap" in e.reason for e in audit)
    asyncio.run(go())


def test_connect_and_resolve_timeouts(https: HttpServer) -> None:
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["127.0.0.1"]

    async def go() -> None:
        pol = policy(allow=["pypi.test"], ports=[https.port], connect_timeout=0.3)
        async with proxy(pol, slow) as (_, port):
            t0 = time.monotonic()
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{https.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 504 and "timed out" in headers["X-Sandvm-Reason"]
            assert time.monotonic() - t0 < 3
        async with proxy(policy(allow=["pypi.test"], ports=[1])) as (_, port):
            status, headers, _ = await raw(port, b"CONNECT pypi.test:1 HTTP/1.1\r\n\r\n")
            assert status == 502 and "cannot connect" in headers["X-Sandvm-Reason"]
    asyncio.run(go())


def test_idle_timeout_closes_a_quiet_tunnel() -> None:
    srv = HalfCloseServer()

    async def go() -> None:
        audit = AuditLog()
        pol = policy(allow=["pypi.test"], ports=[srv.port], idle_timeout=0.5)
        async with proxy(pol, audit=audit) as (_, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            assert await cut(r)
            assert 0.4 < time.monotonic() - t0 < 4
            w.close()
            await asyncio.sleep(0.1)
        assert any(e.action == "close" and e.reason == "idle for 0.5 s" for e in audit)
    try:
        asyncio.run(go())
    finally:
        srv.close()


def test_half_close_goes_through_a_tunnel() -> None:
    srv = HalfCloseServer()

    async def go() -> None:
        async with proxy(policy(allow=["pypi.test"], ports=[srv.port])) as (_, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            await r.readuntil(b"\r\n\r\n")
            w.write(b"q" * 12345)
            w.write_eof()  # the server answers only after our EOF
            assert await asyncio.wait_for(r.read(), 5) == b"got 12345"
            w.close()
    try:
        asyncio.run(go())
    finally:
        srv.close()


def test_policy_update_mid_flight() -> None:
    """Replacing the policy is atomic: a tunnel the new one refuses is cut at once, one
    it still allows goes on, and new requests see the new policy."""
    srv = HalfCloseServer()

    async def go() -> None:
        audit = AuditLog()
        old = policy(allow=["pypi.test", "other.test"], ports=[srv.port])
        async with proxy(old, audit=audit) as (p, port):
            async def tunnel(host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"CONNECT {host}:{srv.port} HTTP/1.1\r\n\r\n".encode())
                assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                return r, w
            (r1, w1), (r2, w2) = await tunnel("pypi.test"), await tunnel("other.test")
            w1.write(b"a" * 10)
            w2.write(b"b" * 20)
            p.set_policy(policy(allow=["other.test"], ports=[srv.port]))
            assert await cut(r1)
            w2.write_eof()
            assert await asyncio.wait_for(r2.read(), 5) == b"got 20"  # untouched
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 403 and "allow list" in headers["X-Sandvm-Reason"]
            for w in (w1, w2):
                w.close()
            await asyncio.sleep(0.1)
        ended = [e for e in audit if e.action == "close" and e.host == "pypi.test"]
        assert ended and ended[0].reason.startswith("the policy changed: pypi.test is not on")
    try:
        asyncio.run(go())
    finally:
        srv.close()


def test_connection_cap_and_bad_requests(https: HttpServer) -> None:
    srv = HalfCloseServer()

    async def go() -> None:
        pol = policy(allow=["pypi.test"], ports=[srv.port], max_connections=2)
        async with proxy(pol) as (p, port):
            held = []
            for _ in range(2):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
                await r.readuntil(b"\r\n\r\n")
                held.append(w)
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 429 and "too many connections" in headers["X-Sandvm-Reason"]
            for w in held:
                w.close()
            await until_async(lambda: p.room() is None, "the closed tunnels' slots back")
            status, _, _ = await raw(port, b"NONSENSE\r\n\r\n")
            assert status == 400
            status, _, _ = await raw(port, b"CONNECT pypi.test:99999 HTTP/1.1\r\n\r\n")
            assert status == 400
            big = b"CONNECT pypi.test:443 HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 70000 + b"\r\n\r\n"
            status, _, _ = await raw(port, big)
            assert status == 431
    try:
        asyncio.run(go())
    finally:
        srv.close()


def test_audit_file_records_every_decision(tmp_path: Path, https: HttpServer,
                                           cert: tuple[Path, Path]) -> None:
    path = tmp_path / "audit" / "egress.jsonl"
    seen: list[str] = []

    async def go() -> None:
        audit = AuditLog(path)
        unsubscribe = audit.subscribe(lambda e: seen.append(e.action))
        async with proxy(policy(allow=["pypi.test"], ports=[https.port]), audit=audit) as (
                _, port), client(port, cert) as c:
            await c.get(f"https://pypi.test:{https.port}/")
            with pytest.raises(httpx.ProxyError):
                await c.get(f"https://other.test:{https.port}/")
        unsubscribe()
    asyncio.run(go())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(e["action"] for e in lines) == ["allow", "close", "deny"] == sorted(seen)
    assert all(e["sandbox_id"] == "sb-test" for e in lines)
    assert path.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- policy specs


def test_policy_validation() -> None:
    p = NetworkPolicy(allow=["PyPI.org.", "*.PythonHosted.org", "bücher.example"],
                      ports=[443, 80, 443])
    assert p.allow == ("pypi.org", "*.pythonhosted.org", "xn--bcher-kva.example")
    assert p.ports == (80, 443)
    assert p.check_host("files.pythonhosted.org", 443) is None
    assert p.check_host("pythonhosted.org", 443) is not None
    assert p.check_host("BÜCHER.example", 443) is None
    for bad, match in [(["*"], "wildcard"), (["*.com"], "too broad"), (["a.*.com"], "wildcard"),
                       (["::1"], "IP literals"), ([""], "non-empty"), (["a b.com"], "valid"),
                       ("pypi.org", "must be a list")]:
        with pytest.raises(InvalidSpec, match=match):
            NetworkPolicy(allow=bad)  # type: ignore[arg-type]
    for kw in ({"ports": [0]}, {"ports": [70000]}, {"ports": ["443"]},
               {"allow_ips": ["nonsense"]}, {"connect_timeout": 0}, {"idle_timeout": -1},
               {"max_bytes": -5}, {"max_connections": 0}, {"allow_http": "yes"}):
        with pytest.raises(InvalidSpec):
            NetworkPolicy(**kw)  # type: ignore[arg-type]
    assert NetworkPolicy(allow_ips=["10.1.2.3"]).allow_ips == ("10.1.2.3/32",)


def test_proxy_env_points_every_client_at_the_proxy() -> None:
    env = proxy_env(3128)
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://127.0.0.1:3128"
    assert "127.0.0.1" in env["NO_PROXY"]


# --------------------------------------------------------------------------- races, tricks


def test_a_policy_change_during_resolution_applies_to_that_request(https: HttpServer) -> None:
    """A request still resolving (or connecting) when the policy changes is decided by
    the new policy, not the one it started under."""
    gate = asyncio.Event()

    async def slow(host: str, port: int) -> list[str]:
        gate.set()
        await asyncio.sleep(0.5)
        return ["127.0.0.1"]

    async def go() -> None:
        async with proxy(policy(allow=["pypi.test"], ports=[https.port]), slow) as (p, port):
            pending = asyncio.ensure_future(raw(
                port, f"CONNECT pypi.test:{https.port} HTTP/1.1\r\n\r\n".encode()))
            await gate.wait()
            p.set_policy(NetworkPolicy())  # deny all while it resolves
            status, headers, _ = await pending
            assert status == 403 and headers["X-Sandvm-Reason"].startswith("the policy changed")
            assert p.active == 0
    asyncio.run(go())


def test_the_connection_cap_holds_for_simultaneous_requests() -> None:
    srv = HalfCloseServer()

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(0.2)
        return ["127.0.0.1"]

    async def go() -> None:
        pol = policy(allow=["pypi.test"], ports=[srv.port], max_connections=2)
        async with proxy(pol, slow) as (_, port):
            async def one() -> int:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                held.append(w)
                return int(head.split()[1])
            held: list[asyncio.StreamWriter] = []
            statuses = await asyncio.gather(*(one() for _ in range(10)))
            assert sorted(statuses) == [200, 200] + [429] * 8
            for w in held:
                w.close()
    try:
        asyncio.run(go())
    finally:
        srv.close()


def test_request_head_tricks_are_refused(http_server: HttpServer) -> None:
    async def go() -> None:
        pol = policy(allow=["pypi.test"], ports=[http_server.port], allow_http=True)
        async with proxy(pol) as (_, port):
            base = f"http://pypi.test:{http_server.port}"
            for head in (f"GET {base}/x\nHost:evil HTTP/1.1\r\n\r\n",
                         f"GET {base}/ HTTP/1.1\r\nX-A: a\nHost: evil\r\n\r\n",
                         f"GET {base}/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
                         f"GET {base}/ HTTP/1.1\r\nX-A: \x00\r\n\r\n",
                         "CONNECT pypi.test:+443 HTTP/1.1\r\n\r\n",
                         "CONNECT pypi.test:4_43 HTTP/1.1\r\n\r\n"):
                status, _, _ = await raw(port, head.encode())
                assert status == 400, head
            # the Host header sent upstream is the checked authority, not the client's
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET {base}/headers HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode())
            data = await asyncio.wait_for(r.read(), 10)
            w.close()
            seen = json.loads(data.partition(b"\r\n\r\n")[2])
            assert seen["Host"] == f"pypi.test:{http_server.port}"
    asyncio.run(go())


def test_ip_literals_in_every_spelling_and_embedded_ipv4() -> None:
    for literal in ("127.1", "2130706433", "0x7f.1", "10.0.0.1.", "[::1]"):
        with pytest.raises(InvalidSpec, match="IP literals"):
            NetworkPolicy(allow=[literal])
    pol = NetworkPolicy(allow=["x.test"])
    for addr in ("::7f00:1", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
                 "::ffff:10.0.0.1", "169.254.169.254", "fd00:ec2::254"):
        assert pol.check_address(addr) is not None, addr
    assert pol.check_address("2002:5db8:d822::1") is None  # 6to4 of a public address
    assert pol.check_address("93.184.216.34") is None


def test_long_guest_host_names_do_not_bloat_the_audit(https: HttpServer) -> None:
    async def go() -> None:
        audit = AuditLog()
        async with proxy(policy(allow=["pypi.test"], ports=[https.port]), audit=audit) as (
                _, port):
            status, _, _ = await raw(port, b"CONNECT " + b"a" * 8000 + b".test:443 HTTP/1.1"
                                     b"\r\n\r\n")
            assert status == 403
        assert all(len(e.reason) <= 300 and len(e.host) <= 255 for e in audit)
    asyncio.run(go())


def test_the_system_resolver_answers_from_its_own_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading

    from sandvm.egress import system_resolver

    threads: list[str] = []
    real = socket.getaddrinfo

    def spy(*a: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    addrs = asyncio.run(system_resolver("localhost", 443))
    assert "127.0.0.1" in addrs or "::1" in addrs
    assert threads and threads[0].startswith("sandvm-dns")  # not the default executor


# --------------------------------------------------------------------------- hostile loads


def test_silent_connections_count_against_the_connection_cap() -> None:
    """A client that connects and says nothing holds a connection (a socket pair on the
    host, in a sandbox): it counts against max_connections from its first byte, so a
    workload cannot hold more silent ones than the cap."""
    srv = HalfCloseServer()

    async def go() -> None:
        audit = AuditLog()
        pol = policy(allow=["pypi.test"], ports=[srv.port], max_connections=3)
        async with proxy(pol, audit=audit) as (p, port):
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            await until_async(lambda: len(p._clients) == 3, "the proxy to take the silent ones")
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 429 and "too many connections" in headers["X-Sandvm-Reason"]
            assert [e.action for e in audit][-1] == "deny"
            for _, w in silent:
                w.close()
            await until_async(lambda: not p._clients, "the silent ones' slots back")
            status, _, _ = await raw(
                port, f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 200
    try:
        asyncio.run(go())
    finally:
        srv.close()


def test_a_name_that_never_resolves_stalls_only_its_own_sandbox(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The system resolver of one sandbox stuck on a name whose DNS never answers (here
    a stub of getaddrinfo that hangs for hang.test) leaves other sandboxes' lookups
    answering: each proxy resolves in threads of its own."""
    import socket
    import threading

    srv = HalfCloseServer()
    release = threading.Event()
    hung: list[str] = []
    real = socket.getaddrinfo

    def stub(host: Any, port: Any, *a: Any, **kw: Any) -> Any:
        if host == "hang.test":
            hung.append(host)
            release.wait(60)
            raise OSError("released")
        if host == "pypi.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        if host == "127.0.0.1":  # numeric: answers without any lookup
            return real(host, port, *a, **kw)
        raise OSError(f"the test resolver does not know {host!r}")

    monkeypatch.setattr(socket, "getaddrinfo", stub)

    async def go() -> None:
        tenant_a = EgressProxy(policy(allow=["hang.test"], ports=[srv.port],
                                      connect_timeout=30), sandbox_id="sb-a")
        tenant_b = EgressProxy(policy(allow=["pypi.test"], ports=[srv.port],
                                      connect_timeout=10), sandbox_id="sb-b")
        srv_a, srv_b = await tenant_a.serve_tcp(), await tenant_b.serve_tcp()
        port_a, port_b = (s.sockets[0].getsockname()[1] for s in (srv_a, srv_b))
        try:
            stuck = [asyncio.create_task(raw(port_a, f"CONNECT hang.test:{srv.port}"
                                             " HTTP/1.1\r\n\r\n".encode()))
                     for _ in range(16)]
            await until_async(lambda: len(hung) >= 4, "sandbox a's lookups to hang")
            status, headers, _ = await raw(
                port_b, f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 200, headers
            assert len(hung) <= 16
            for t in stuck:
                t.cancel()
        finally:
            release.set()
            for p, s in ((tenant_a, srv_a), (tenant_b, srv_b)):
                await p.aclose()
                s.close()
    try:
        asyncio.run(go())
    finally:
        release.set()
        srv.close()


def test_special_use_names_never_reach_the_resolver(https: HttpServer) -> None:
    calls: list[str] = []

    async def go() -> None:
        pol = policy(allow=["localhost", "a.localhost", "gone.invalid"], ports=[https.port],
                     allow_ips=[])
        async with proxy(pol, table({}, calls)) as (_, port):
            for name in ("localhost", "a.localhost"):
                status, headers, _ = await raw(
                    port, f"CONNECT {name}:{https.port} HTTP/1.1\r\n\r\n".encode())
                assert status == 403 and "loopback" in headers["X-Sandvm-Reason"], name
            status, headers, _ = await raw(
                port, f"CONNECT gone.invalid:{https.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 502 and "RFC 6761" in headers["X-Sandvm-Reason"]
    asyncio.run(go())
    assert calls == []


def test_repeated_refusals_are_coalesced_and_the_file_is_capped(tmp_path: Path) -> None:
    """A guest repeating a refused request: the audit file gets one record for the
    first and one with the count of the repeats, not one per request; past its byte
    cap it gets one "dropped N events" record; when the sandbox ends it is moved to
    ended/, where only the newest KEEP_ENDED are kept."""
    from sandvm import egress_policy as egress

    def deny(host: str, n: int) -> egress.EgressEvent:
        return egress.EgressEvent(ts=time.time(), sandbox_id="sb-x", action="deny",
                                  method="CONNECT", host=host, port=443,
                                  reason=f"{host} is not on this sandbox's allow list")

    path = tmp_path / "audit" / "egress-sb-x.jsonl"
    audit = AuditLog(path, window=3600)
    seen: list[egress.EgressEvent] = []
    audit.subscribe(seen.append)
    for i in range(2000):
        audit.record(deny("evil.test", i))
        audit.record(deny("other.test", i))
    assert len(seen) == 4000  # subscribers see every event
    assert path.stat().st_size < 1000  # two first records, the repeats pending
    audit.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 4
    assert sorted((x["host"], x["count"]) for x in lines) == [
        ("evil.test", 1), ("evil.test", 1999), ("other.test", 1), ("other.test", 1999)]
    assert sum(e.count for e in audit.events()) == 4000

    # distinct refusals (nothing to coalesce) up to the cap, then a "dropped" record
    capped = AuditLog(tmp_path / "audit" / "egress-sb-y.jsonl", max_bytes=20_000)
    for i in range(1000):
        capped.record(deny(f"h{i}.test", i))
    capped.close()
    assert capped.path is not None
    size = capped.path.stat().st_size
    assert size <= 20_000
    last = json.loads(capped.path.read_text().splitlines()[-1])
    assert last["action"] == "dropped" and last["count"] > 900 and "cap" in last["reason"]
    # a later holder of the same sandbox starts from what is there: the cap holds
    again = AuditLog(capped.path, max_bytes=20_000)
    for i in range(100):
        again.record(deny(f"g{i}.test", i))
    again.close()
    assert capped.path.stat().st_size <= 20_000

    # the sandbox ends: the file moves to ended/, the oldest ended ones go
    moved = audit.end()
    assert moved == tmp_path / "audit" / "ended" / "egress-sb-x.jsonl" and moved.exists()
    assert not path.exists()
    for i in range(egress.KEEP_ENDED + 5):
        AuditLog(tmp_path / "audit" / f"egress-e{i}.jsonl").end()
    assert len(list((tmp_path / "audit" / "ended").iterdir())) == egress.KEEP_ENDED


def test_the_descriptor_budget_refuses_upstream_connections_before_the_process_runs_out(
        ) -> None:
    from sandvm.fds import MIN_RESERVE, FdBudget

    budget = FdBudget(limit=MIN_RESERVE + 8)  # 8 for guest connections, 2 per sandbox
    assert (budget.capacity, budget.share) == (8, 2)
    assert budget.acquire("a", 2) is None
    assert "share" in (budget.acquire("a", 1) or "")
    for sb in ("b", "c", "d"):
        assert budget.acquire(sb, 2) is None
    assert "open-file limit" in (budget.acquire("e", 1) or "")
    budget.release("a", 2)
    assert budget.acquire("e", 1) is None and budget.held == 7

    srv = HalfCloseServer()

    async def go() -> None:
        audit = AuditLog()
        tight = FdBudget(limit=MIN_RESERVE + 4)  # one upstream connection per sandbox
        pol = policy(allow=["pypi.test"], ports=[srv.port])
        p = EgressProxy(pol, sandbox_id="sb-fd", resolver=table(NAMES), audit=audit,
                        budget=tight)
        server = await p.serve_tcp()
        port = server.sockets[0].getsockname()[1]
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            assert tight.held_by("sb-fd") == 1
            status, headers, _ = await raw(
                port, f"CONNECT pypi.test:{srv.port} HTTP/1.1\r\n\r\n".encode())
            assert status == 503 and "descriptors" in headers["X-Sandvm-Reason"]
            assert audit.events()[-1].action == "error"
            w.close()
            await until_async(lambda: tight.held == 0, "the descriptor back")
        finally:
            await p.aclose()
            server.close()
    try:
        asyncio.run(go())
    finally:
        srv.close()


def test_raise_nofile_limit_is_idempotent() -> None:
    import resource
    import subprocess
    import sys

    code = ("import resource; from sandvm.fds import raise_nofile_limit as r;"
            "s, h = resource.getrlimit(resource.RLIMIT_NOFILE);"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, h), h));"
            "a = r(); b = r(); print(a == b == resource.getrlimit(resource.RLIMIT_NOFILE),"
            " a[0] == h)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "True"]
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 0


def test_upstream_connections_outside_loopback_are_caught(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The seam every proxy connects through: with SANDVM_EGRESS_LOOPBACK_ONLY (the test
    suite sets it) a connection anywhere but loopback is refused and noted."""
    from sandvm import egress

    note = tmp_path / "violations"
    monkeypatch.setenv(egress.LOOPBACK_ONLY_ENV, str(note))

    async def go() -> None:
        with pytest.raises(OSError, match="only loopback"):
            await egress.open_upstream("192.0.2.1", 443)  # TEST-NET-1: never contacted
    asyncio.run(go())
    assert "192.0.2.1:443" in note.read_text()


def test_an_ended_sandbox_nobody_held_gets_its_audit_file_moved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandvm.network import audit_file, end_audit

    monkeypatch.setenv("SANDVM_AUDIT_DIR", str(tmp_path))
    AuditLog(audit_file("sb-gone")).record(EgressEvent(
        ts=time.time(), sandbox_id="sb-gone", action="deny", method="CONNECT",
        host="x.test", port=443, reason="x.test is not on this sandbox's allow list"))
    assert end_audit("sb-gone") == tmp_path / "ended" / "egress-sb-gone.jsonl"
    assert not audit_file("sb-gone").exists() and end_audit("sb-gone") is None


def test_the_manager_moves_audit_files_of_sandboxes_that_ended_unheld(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a managed sandbox killed by id, or ended by its keeper (TTL), had no proxy to
    # move its audit file: kill and gc do it; a running one's file stays
    from sandvm.network import audit_file
    from sandvm.runtime.manager import SandboxManager

    monkeypatch.setenv("SANDVM_AUDIT_DIR", str(tmp_path / "audit"))
    monkeypatch.setenv("SANDVM_JOURNAL", str(tmp_path / "journal.db"))
    monkeypatch.setenv("SANDVM_SNAPSHOT_DIR", str(tmp_path / "snapshots"))
    m = SandboxManager()
    for sid in ("sb-killed", "sb-expired", "sb-running"):
        m.journal.add(sid, state="running")
        AuditLog(audit_file(sid)).record(EgressEvent(
            ts=time.time(), sandbox_id=sid, action="deny", method="CONNECT", host="x.test",
            port=443, reason="x.test is not on this sandbox's allow list"))
    asyncio.run(m.kill("sb-killed"))
    assert not audit_file("sb-killed").exists()
    assert (tmp_path / "audit" / "ended" / "egress-sb-killed.jsonl").exists()
    assert audit_file("sb-running").exists() and audit_file("sb-expired").exists()
    m.journal.end("sb-expired", "expired")  # as its keeper records a TTL
    m.gc()  # (it also repairs sb-running: no keeper runs it here)
    for sid in ("sb-expired", "sb-running"):
        assert not audit_file(sid).exists()
        assert (tmp_path / "audit" / "ended" / f"egress-{sid}.jsonl").exists()
