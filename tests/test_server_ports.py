"""Port exposure and network policy updates over HTTP, through `sandvm serve` and the real
client, with a real guest.

One server for the module (tenant alice may expose 2 ports at once) and one sandbox of
alice's, made without network. Ports: a Python http.server in the guest, exposed on the
server's host, fetched through its URL with httpx, closed; a server restart re-opens
the listener on its own (before any request names the sandbox).

Network: a policy an API client sets can allow names and ports but not addresses that
are not public (``allow_ips`` and ``hosts`` are the operator's), and this machine has no
network beyond loopback, so no request can be allowed *and* succeed here. The tests
show what is observable honestly: the policy update takes effect at once (a name goes
from "not on the allow list" to allowed by name), and an allowed name that resolves to
loopback is still refused, although a real HTTP server listens there on the host. The
names used never reach a resolver: ``localhost`` is loopback and ``.invalid`` never
resolves (RFC 6761), both answered by the proxy itself.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator

import httpx
import pytest

from egress_servers import HttpServer
from sandvm import ExposedPort, InvalidSpec, NetworkPolicy, PortTimeout, QuotaExceeded
from sandvm.client import Sandbox
from test_server import ServerProc, _auth, until

pytestmark = pytest.mark.qemu

WWW = "cd /tmp/www && exec python3 -m http.server {port} --bind 127.0.0.1"

# an HTTP request through the guest's egress proxy (127.0.0.1:3128), raw: no client
# library's proxy rules (no_proxy has localhost) stand between the test and the proxy
FETCH = r'''
import socket, sys
host, port = sys.argv[1], sys.argv[2]
try:
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
except OSError as e:
    print("no proxy:", e)
    sys.exit(0)
s.sendall(f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\n"
          "Connection: close\r\n\r\n".encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(tmp_path_factory.mktemp("ports"), max_sandboxes=2,
                     extra=("--max-ports", "2"))
    srv.alice, srv.bob = srv.key("alice"), srv.key("bob")
    with srv.running():
        yield srv


@pytest.fixture(scope="module")
def sb(server: ServerProc) -> Iterator[Sandbox]:
    box = Sandbox.create(api_key=server.alice, url=server.url, timeout=900)
    box.files.write("/tmp/www/index.html", "hello from the guest\n")
    box.files.write("/tmp/fetch.py", FETCH)
    yield box
    box.kill()


def _serve_www(box: Sandbox, port: int = 8000) -> None:
    box.commands.run(WWW.format(port=port), background=True, timeout=900)
    box.ports.wait(port, timeout=60)



# ---------------------------------------------------------------------------- ports


def test_expose_fetch_list_close(server: ServerProc, sb: Sandbox) -> None:
    _serve_www(sb)
    url = sb.ports.expose(8000)
    assert isinstance(url, ExposedPort) and url.guest_port == 8000
    assert url.host == "127.0.0.1" and url == f"http://127.0.0.1:{url.port}"
    r = httpx.get(url + "/index.html", timeout=30)
    assert r.status_code == 200 and r.text == "hello from the guest\n"
    with httpx.Client(timeout=30) as c:  # several connections, one listener
        assert all(c.get(url + "/index.html").status_code == 200 for _ in range(5))
    assert sb.ports.expose(8000) == url  # exposing again: the same listener
    assert sb.ports.list() == [url]
    raw = httpx.get(f"{server.url}/v1/sandboxes/{sb.sandbox_id}/ports",
                    headers=_auth(server.alice)).json()
    assert raw == {"ports": [{"port": 8000, "url": str(url), "host": "127.0.0.1",
                              "host_port": url.port}]}
    # another tenant: no such sandbox, and its ports are not touched
    r = httpx.delete(f"{server.url}/v1/sandboxes/{sb.sandbox_id}/ports/8000",
                     headers=_auth(server.bob))
    assert r.status_code == 404 and r.json()["code"] == "vm_not_found"
    assert httpx.get(url + "/index.html", timeout=30).status_code == 200
    metrics = httpx.get(server.url + "/metrics", headers=_auth(server.alice)).text
    assert "sandvm_ports_exposed_total 1" in metrics and "sandvm_ports_open 1" in metrics
    assert sb.ports.close(url) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)
    assert sb.ports.list() == [] and sb.ports.close(8000) == 0


def test_wait_times_out_and_ports_are_checked(server: ServerProc, sb: Sandbox) -> None:
    with pytest.raises(PortTimeout, match="8009"):
        sb.ports.wait(8009, timeout=1)
    base = f"{server.url}/v1/sandboxes/{sb.sandbox_id}/ports"
    h = _auth(server.alice)
    r = httpx.post(f"{base}/8009/wait", headers=h, json={"timeout": 0.5})
    assert r.status_code == 504 and r.json()["code"] == "port_timeout"
    r = httpx.post(f"{base}/8009/wait", headers=h, json={"timeout": 600})  # over the cap
    assert r.status_code == 422
    for bad in (0, 65536, "80", 80.5, None):
        r = httpx.post(base, headers=h, json={"port": bad})
        assert r.status_code == 422 and r.json()["code"] == "invalid_spec", bad
    assert httpx.delete(f"{base}/0", headers=h).status_code == 422
    with pytest.raises(InvalidSpec):
        sb.ports.expose(0)
    with pytest.raises(InvalidSpec):
        sb.ports.wait(80, timeout=0)


def test_exposed_ports_per_tenant_cap(server: ServerProc, sb: Sandbox) -> None:
    a, b = sb.ports.expose(9001), sb.ports.expose(9002)
    with pytest.raises(QuotaExceeded, match="2 ports exposed") as ei:
        sb.ports.expose(9003)
    assert "DELETE" in ei.value.message  # says what to do
    assert sb.ports.expose(9002) == b  # an exposed one is no new one
    assert sb.ports.close(9001) == 1
    c = sb.ports.expose(9003)
    assert sorted(p.guest_port for p in sb.ports.list()) == [9002, 9003]
    # nothing listens on 9003 in the guest: a connection is reset, the listener stays
    with pytest.raises(httpx.TransportError):
        httpx.get(c, timeout=10)
    assert sb.ports.close(b) == 1 and sb.ports.close(c) == 1
    assert a not in sb.ports.list()


# ---------------------------------------------------------------------------- network


def _fetch(box: Sandbox, host: str, port: int) -> str:
    return box.commands.run(["python3", "/tmp/fetch.py", host, str(port)], timeout=60).stdout


def test_network_policy_updates(server: ServerProc, sb: Sandbox) -> None:
    assert sb.network.policy is None and not sb.get_info().network
    info = sb.network.info()
    assert not info.enabled and info.bytes_total == 0 and sb.network.events() == []
    assert _fetch(sb, "denied.invalid", 80).startswith("no proxy:")  # no egress at all
    with HttpServer("127.0.0.1", label="the host") as host_srv:
        port = host_srv.port
        # a sandbox made without network gets egress from its first policy (as locally)
        policy = NetworkPolicy(allow=["localhost"], ports=[port], allow_http=True)
        sb.network.set_policy(policy)
        assert sb.network.policy == policy and sb.get_info().network
        assert sb.network.info().enabled
        out = _fetch(sb, "denied.invalid", port)
        assert " 403 " in out.splitlines()[0], out
        assert "denied.invalid is not on this sandbox's allow list" in out
        # allowed by name, but it is the server's loopback: refused all the same
        out = _fetch(sb, "localhost", port)
        assert " 403 " in out.splitlines()[0] and "loopback" in out, out
        assert "hello from the host" not in out
        events = sb.network.events()
        assert [(e.action, e.host) for e in events] == [("deny", "denied.invalid"),
                                                         ("deny", "localhost")]
        assert all(e.sandbox_id == sb.sandbox_id for e in events)
        assert "loopback" in events[1].reason and sb.network.events(limit=1) == events[1:]
        # the update takes effect at once: denied.invalid passes the name check now (and
        # then does not resolve: .invalid names never do, no resolver is asked)
        sb.network.set_policy(NetworkPolicy(allow=["denied.invalid"], ports=[port],
                                            allow_http=True))
        out = _fetch(sb, "denied.invalid", port)
        assert "not on this sandbox's allow list" not in out and " 200 " not in out, out
        last = sb.network.events()[-1]
        assert (last.host, last.action) == ("denied.invalid", "error"), last
        assert "RFC 6761" in last.reason
        assert "not on this sandbox's allow list" in _fetch(sb, "localhost", port)
    raw = httpx.get(f"{server.url}/v1/sandboxes/{sb.sandbox_id}/network",
                    headers=_auth(server.alice)).json()
    assert raw["policy"] == {"allow": ["denied.invalid"], "ports": [port], "allow_http": True,
                             "max_bytes": None} and raw["enabled"] is True
    # addresses that are not public stay the operator's call
    with pytest.raises(InvalidSpec, match="operator"):
        sb.network.set_policy(NetworkPolicy(allow=["x.test"], allow_ips=["127.0.0.1/32"]))
    r = httpx.put(f"{server.url}/v1/sandboxes/{sb.sandbox_id}/network",
                  headers=_auth(server.alice),
                  json={"allow": ["x.test"], "allow_ips": ["127.0.0.1/32"]})
    assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
    r = httpx.put(f"{server.url}/v1/sandboxes/{sb.sandbox_id}/network",
                  headers=_auth(server.bob), json={"allow": ["evil.test"]})
    assert r.status_code == 404
    assert sb.network.policy is not None and sb.network.policy.allow == ("denied.invalid",)


# ---------------------------------------------------------------------------- restart


def test_restart_reopens_exposed_ports_and_keeps_the_policy(server: ServerProc,
                                                           sb: Sandbox) -> None:
    url = sb.ports.expose(8000)
    policy = sb.network.policy
    server.stop(signal.SIGTERM)
    with pytest.raises(OSError):  # the listener was the server's
        socket.create_connection((url.host, url.port), timeout=2).close()
    server.start()

    def listening() -> bool:
        try:
            socket.create_connection((url.host, url.port), timeout=2).close()
            return True
        except OSError:
            return False

    until(listening, "the server to listen for the exposed port again")  # no request yet
    again = Sandbox.connect(sb.sandbox_id, api_key=server.alice, url=server.url)
    assert again.ports.list() == [url]  # same host port: it was free
    assert again.network.policy == policy
    _serve_www(again)  # the guest's server went with the old server's hold
    assert httpx.get(url + "/index.html", timeout=30).text == "hello from the guest\n"
    assert again.ports.close(8000) == 1
    again.close()
    raw = json.loads(httpx.get(f"{server.url}/v1/sandboxes/{sb.sandbox_id}/ports",
                               headers=_auth(server.alice)).text)
    assert raw == {"ports": []}


# ---------------------------------------------------------------------------- caps


def test_the_header_count_cap(server: ServerProc) -> None:
    """At most 100 request headers (app.MAX_HEADERS): one more gets 431, before any
    authentication or routing."""
    from urllib.parse import urlsplit

    u = urlsplit(server.url)

    def status(n_headers: int) -> tuple[int, bytes]:
        lines = ["GET /health HTTP/1.1", f"Host: {u.hostname}:{u.port}", "Connection: close"]
        lines += [f"X-Pad-{i}: {i}" for i in range(n_headers - 2)]
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return int(data.split()[1]), data.partition(b"\r\n\r\n")[2]

    assert status(100)[0] == 200
    code, body = status(101)
    assert code == 431 and json.loads(body)["code"] == "request_too_large"
    assert b"100 headers" in body

