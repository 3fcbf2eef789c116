"""Egress proxy (issue 6): what the policed path costs per HTTPS request against a
direct request from the host, and its throughput.

One HTTPS server on 127.0.0.1 (self-signed certificate, as in the tests). Three ways
to reach it, each opening a new connection (TCP + TLS) per request, N times:
- ``host_direct``: a client on the host connects straight to it;
- ``host_via_proxy``: a client on the host goes through an EgressProxy on loopback
  (the policy code and the relaying, without the VM);
- ``guest_via_proxy``: a client in the guest (Python, HTTPS_PROXY from the sandbox)
  goes through the guest listener, the agent channel and the host's proxy.
The overhead is the guest figure minus the host-direct one; ``guest_connect_answered``
(a CONNECT until its 200, no TLS) shows how much of it is the path and how much the
guest's own TLS work under TCG. Throughput: one 32 MiB
download in the guest through the proxy. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from _util import emit, summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from egress_servers import HttpServer, make_cert
from sandvm import NetworkPolicy, Sandbox
from sandvm.egress import EgressProxy

N = 60
BULK = 32 << 20

GUEST = r'''
import json, socket, ssl, sys, time
port, n, bulk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context(cafile="/tmp/ca.pem")

def get(path):
    s = socket.create_connection(("127.0.0.1", 3128))
    s.sendall(f"CONNECT pypi.test:{port} HTTP/1.1\r\nHost: pypi.test\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    t = ctx.wrap_socket(s, server_hostname="pypi.test")
    t.sendall(f"GET {path} HTTP/1.1\r\nHost: pypi.test\r\nConnection: close\r\n\r\n".encode())
    got = 0
    while True:
        b = t.recv(1 << 16)
        if not b:
            break
        got += len(b)
    t.close()
    return got

tunnel = []  # CONNECT answered: the proxy path without the guest's TLS work
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", 3128))
    s.sendall(f"CONNECT pypi.test:{port} HTTP/1.1\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    tunnel.append(time.perf_counter() - t0)
    s.close()
times = []
for _ in range(n):
    t0 = time.perf_counter()
    get("/")
    times.append(time.perf_counter() - t0)
t0 = time.perf_counter()
got = get(f"/bytes/{bulk}")
print(json.dumps({"times": times, "tunnel": tunnel, "bulk_s": time.perf_counter() - t0,
                  "bulk_bytes": got}))
'''


def host_get(port: int, ctx: ssl.SSLContext, *, proxy: int | None) -> float:
    t0 = time.perf_counter()
    if proxy is None:
        s = socket.create_connection(("127.0.0.1", port))
    else:
        s = socket.create_connection(("127.0.0.1", proxy))
        s.sendall(f"CONNECT pypi.test:{port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
    t = ctx.wrap_socket(s, server_hostname="pypi.test")
    t.sendall(b"GET / HTTP/1.1\r\nHost: pypi.test\r\nConnection: close\r\n\r\n")
    while t.recv(65536):
        pass
    t.close()
    return time.perf_counter() - t0


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    cert = make_cert(tmp)
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    with HttpServer("127.0.0.1", tls=cert) as srv:
        policy = NetworkPolicy(allow=["pypi.test"], ports=[srv.port],
                               hosts={"pypi.test": "127.0.0.1"}, allow_ips=["127.0.0.1/32"])
        direct = [host_get(srv.port, ctx, proxy=None) for _ in range(N)]

        # the proxy alone, on loopback, in its own event loop thread
        import threading

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        proxy = EgressProxy(policy, sandbox_id="bench")
        server = asyncio.run_coroutine_threadsafe(proxy.serve_tcp(), loop).result()
        pport = server.sockets[0].getsockname()[1]
        via = [host_get(srv.port, ctx, proxy=pport) for _ in range(N)]
        loop.call_soon_threadsafe(server.close)

        sb = Sandbox.create(image="base", network=policy)
        try:
            sb.files.write("/tmp/ca.pem", cert[0].read_bytes())
            sb.files.write("/tmp/bench.py", GUEST)
            r = sb.commands.run(["python3", "/tmp/bench.py", str(srv.port), str(N), str(BULK)],
                                timeout=600)
            guest = json.loads(r.stdout)
            events = sb.network.events()
        finally:
            sb.kill()
    assert guest["bulk_bytes"] > BULK
    g, d = summary(guest["times"]), summary(direct)
    emit({"benchmark": "egress", "accelerator": "tcg", "requests": N,
          "https_request_new_connection_ms": {
              "host_direct": d, "host_via_proxy": summary(via), "guest_via_proxy": g},
          "guest_connect_answered_ms": summary(guest["tunnel"]),
          "guest_overhead_vs_host_direct_p50_ms": round(g["p50"] - d["p50"], 3),
          "guest_download_mb_s": round(BULK / guest["bulk_s"] / 1e6, 1),
          "audited_events": len(events)})


if __name__ == "__main__":
    main()
