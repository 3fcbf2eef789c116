"""Egress from a real guest: the workload's HTTP(S) goes through the guest listener,
the agent channel and the host's proxy, which applies the sandbox's policy.

Servers are real (HTTP and HTTPS with a self-signed certificate) on 127.0.0.1; test
names are pinned with ``NetworkPolicy.hosts`` and loopback is allowed explicitly, so
nothing leaves the machine (conftest's guard fails a test whose proxy tries). The
per-rule tests of the proxy are in test_egress.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_servers import BlackHole, HoldServer, HttpServer
from sandvm import Sandbox
from sandvm.egress import EgressEvent, NetworkPolicy
from sandvm.errors import InvalidSpec

pytestmark = pytest.mark.qemu

NAMES = {"pypi.test": "127.0.0.1", "other.test": "127.0.0.1", "files.pythonhosted.test":
         "127.0.0.1"}

# a client in the guest: fetch each URL through the proxy from the environment
GET = r'''
import hashlib, json, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile="/tmp/ca.pem")
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
out = []
for url in sys.argv[1:]:
    try:
        body = opener.open(url, timeout=30).read()
        out.append({"ok": True, "len": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                    "text": body[:100].decode(errors="replace")})
    except OSError as e:
        out.append({"ok": False, "error": str(e)})
print(json.dumps(out))
'''


def _policy(port: int, *allow: str, **kw: Any) -> NetworkPolicy:
    return NetworkPolicy(allow=allow or ("pypi.test",), ports=[port], hosts=NAMES,
                         allow_ips=["127.0.0.1/32"], **kw)


@pytest.fixture(scope="module", params=["cold", "restored"])
def netbox(request: pytest.FixtureRequest, https: HttpServer,
           cert: tuple[Path, Path]) -> Iterator[Sandbox]:
    """A sandbox whose policy allows pypi.test (cold-booted, or restored from the
    session's base snapshot: both paths must give egress)."""
    if request.param == "cold":
        sb = Sandbox.create(network=_policy(https.port))
    else:
        sb = Sandbox.from_snapshot(request.getfixturevalue("base_snapshot"),
                                   store=request.getfixturevalue("snapshot_store"),
                                   network=_policy(https.port))
    try:
        sb.files.write("/tmp/ca.pem", cert[0].read_bytes())
        sb.files.write("/tmp/get.py", GET)
        yield sb
    finally:
        sb.kill()


def _get(sb: Sandbox, *urls: str) -> list[dict[str, Any]]:
    r = sb.commands.run(["python3", "/tmp/get.py", *urls], timeout=120)
    return list(json.loads(r.stdout))


def test_allowed_and_refused_from_the_guest(netbox: Sandbox, https: HttpServer) -> None:
    seen: list[EgressEvent] = []
    unsubscribe = netbox.network.subscribe(seen.append)
    try:
        ok, refused = _get(netbox, f"https://pypi.test:{https.port}/",
                           f"https://other.test:{https.port}/")
    finally:
        unsubscribe()
    assert ok["ok"] and ok["text"] == "hello from https-1\n"
    # the guest's own error names the status and the reason
    assert not refused["ok"]
    assert "403" in refused["error"] and "other.test is not on this sandbox's allow list" \
        in refused["error"]
    # ... and the host saw both decisions
    assert ("allow", "pypi.test") in [(e.action, e.host) for e in seen]
    assert ("deny", "other.test") in [(e.action, e.host) for e in seen]
    assert netbox.network.events()[-1].sandbox_id == netbox.sandbox_id


def test_workloads_get_the_proxy_environment(netbox: Sandbox) -> None:
    env = netbox.commands.run("env").stdout
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in env and "NO_PROXY=" in env
    # the caller's own variables win
    r = netbox.commands.run("echo $HTTPS_PROXY", env={"HTTPS_PROXY": "http://mine:1"})
    assert r.stdout.strip() == "http://mine:1"


def test_large_and_concurrent_downloads_arrive_whole(netbox: Sandbox, https: HttpServer) -> None:
    urls = [f"https://pypi.test:{https.port}/bytes/{n}" for n in (5_000_000, 1, 777_777)]
    results = _get(netbox, *urls)
    for res, n in zip(results, (5_000_000, 1, 777_777), strict=True):
        assert res["ok"] and res["len"] == n
        assert res["sha256"] == hashlib.sha256(b"x" * n).hexdigest()
    # several clients at once
    script = ("python3 /tmp/get.py " + f"https://pypi.test:{https.port}/bytes/300000 " * 4)
    r = netbox.commands.run(" & ".join([script] * 4) + " & wait", timeout=120)
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(runs) == 4 and all(x["ok"] and x["len"] == 300000 for run in runs for x in run)


def test_policy_update_on_a_running_sandbox(netbox: Sandbox, https: HttpServer) -> None:
    url = f"https://files.pythonhosted.test:{https.port}/"
    before = netbox.network.policy
    assert before is not None
    try:
        assert not _get(netbox, url)[0]["ok"]
        netbox.network.set_policy(_policy(https.port, "pypi.test", "*.pythonhosted.test"))
        assert _get(netbox, url)[0]["ok"]
        netbox.network.set_policy(NetworkPolicy())  # deny all, at once
        res = _get(netbox, f"https://pypi.test:{https.port}/")[0]
        assert not res["ok"] and "403" in res["error"]
    finally:
        netbox.network.set_policy(before)


def test_no_policy_means_no_network(sandbox: Any) -> None:
    """The shared sandbox was made without a policy: no proxy variables, nothing
    listens on the proxy port, and no egress events."""
    assert not sandbox.network.enabled and sandbox.network.policy is None
    assert "PROXY" not in sandbox.commands.run("env").stdout
    r = sandbox.commands.run(["python3", "-c", "import socket; socket.create_connection("
                              "('127.0.0.1', 3128), timeout=5)"], check=False)
    assert r.exit_code != 0 and "refused" in r.stderr.lower()
    with pytest.raises(InvalidSpec, match="NetworkPolicy"):
        Sandbox.create(network={"allow": ["pypi.org"]})  # type: ignore[arg-type]


def test_audit_file(netbox: Sandbox, https: HttpServer) -> None:
    _get(netbox, f"https://other.test:{https.port}/")
    path = netbox.network.audit_path
    assert path is not None and path.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[-1]["action"] == "deny" and lines[-1]["host"] == "other.test"
    assert "allow list" in lines[-1]["reason"]


def test_cli_allow_host(https: HttpServer) -> None:
    code = ("import ssl, urllib.request as u; ctx = ssl.create_default_context(cafile=None);"
            "ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE;"
            f"print(u.build_opener(u.HTTPSHandler(context=ctx)).open("
            f"'https://pypi.test:{https.port}/', timeout=30).read().decode(), end='')")
    r = subprocess.run([sys.executable, "-m", "sandvm.cli", "run", "--image", "base",
                        "--allow-host", "pypi.test", "--allow-port", str(https.port),
                        "--allow-ip", "127.0.0.1", "--add-host", "pypi.test=127.0.0.1",
                        "--", "python3", "-c", code], capture_output=True, text=True,
                       timeout=180)
    assert (r.returncode, r.stdout) == (0, "hello from https-1\n"), r.stderr
    r = subprocess.run([sys.executable, "-m", "sandvm.cli", "run", "--allow-port", "443",
                        "--", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--allow-host" in r.stderr


def test_a_managed_sandbox_keeps_its_policy_across_holders(https: HttpServer,
                                                           tmp_path: Path) -> None:
    """`sandvm create --allow-host ...` then `sandvm exec` from other processes: each
    holder restores the policy from the journal; set_policy by one holder is what the
    next one gets."""
    import asyncio
    import os

    from sandvm.runtime.journal import Journal
    from sandvm.runtime.manager import SandboxManager

    env = {**os.environ, "SANDVM_JOURNAL": str(tmp_path / "journal.db")}
    cli = [sys.executable, "-m", "sandvm.cli"]
    r = subprocess.run([*cli, "create", "--image", "base", "--ttl", "120",
                        "--allow-host", "pypi.test", "--allow-port", str(https.port),
                        "--allow-ip", "127.0.0.1", "--add-host", "pypi.test=127.0.0.1",
                        "--add-host", "other.test=127.0.0.1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    fetch = ("import ssl, sys, urllib.request as u; c = ssl._create_unverified_context();"
             "print(u.build_opener(u.HTTPSHandler(context=c)).open(sys.argv[1],"
             " timeout=30).status)")

    def exec_get(host: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, "exec", sid, "--", "python3", "-c", fetch,
                               f"https://{host}:{https.port}/"],
                              capture_output=True, text=True, env=env, timeout=120)

    m = SandboxManager(Journal(tmp_path / "journal.db"))
    try:
        assert exec_get("pypi.test").stdout == "200\n"
        denied = exec_get("other.test")
        assert denied.returncode != 0 and "not on this sandbox's allow list" in denied.stderr

        async def widen() -> None:
            sb = await m.attach(sid)
            pol = sb.network.policy
            assert pol is not None and pol.allow == ("pypi.test",)
            # the bytes earlier holders moved still count against the sandbox's byte cap
            rec = m.journal.get(sid)
            assert rec is not None
            used = rec.record["network_bytes"]
            assert sb.network._proxy is not None and sb.network._proxy.bytes_total == used > 0
            await sb.network.set_policy(NetworkPolicy(
                allow=["pypi.test", "other.test"], ports=pol.ports, allow_ips=pol.allow_ips,
                hosts=pol.hosts))
            await m.detach(sb)

        asyncio.run(widen())
        assert exec_get("other.test").stdout == "200\n"
    finally:
        asyncio.run(m.kill(sid))


def test_forks_keep_the_policy(netbox: Sandbox, https: HttpServer) -> None:
    clone = netbox.fork(1)[0]
    try:
        assert clone.network.policy == netbox.network.policy
        assert clone.network.audit_path != netbox.network.audit_path
        ok, refused = _get(clone, f"https://pypi.test:{https.port}/",
                           f"https://other.test:{https.port}/")
        assert ok["ok"] and not refused["ok"] and "403" in refused["error"]
        assert [e.action for e in clone.network.events()][-1] == "deny"
    finally:
        clone.kill()


def test_pool_sandboxes_get_the_policy(https: HttpServer, cert: tuple[Path, Path],
                                       base_snapshot: Any, snapshot_store: Any) -> None:
    from sandvm.pools import Pool

    pool = Pool(snapshot=base_snapshot, store=snapshot_store, min_size=1, max_size=1,
                network=_policy(https.port))
    try:
        with pool.acquire(timeout=60) as sb:
            assert sb.network.policy == _policy(https.port)
            sb.files.write("/tmp/ca.pem", cert[0].read_bytes())
            sb.files.write("/tmp/get.py", GET)
            assert _get(sb, f"https://pypi.test:{https.port}/")[0]["ok"]
    finally:
        pool.close()


def test_silent_guest_connections_neither_pile_up_nor_block_egress(
        netbox: Sandbox, https: HttpServer) -> None:
    """A workload that opens many proxy connections and says nothing: egress keeps
    working for everyone else, and once those connections close nothing of them stays
    on the host."""
    import time

    hold = ("import socket, time; s = [socket.create_connection(('127.0.0.1', 3128))"
            " for _ in range(30)]; print('open', flush=True); time.sleep(60)")
    h = netbox.commands.run(["python3", "-c", hold], background=True)
    try:
        deadline = time.monotonic() + 30
        while "open" not in h.stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "open" in h.stdout
        assert _get(netbox, f"https://pypi.test:{https.port}/")[0]["ok"]
        assert len(netbox.network._a._bridges) >= 30
    finally:
        h.kill()
    deadline = time.monotonic() + 20
    while netbox.network._a._bridges and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not netbox.network._a._bridges


# a raw proxy client in the guest: CONNECT (or a plain GET) and report the status line
PROBE = r'''
import json, socket, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
if mode == "connect":
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
else:
    s.sendall(f"GET http://{host}:{port}/bytes/{mode} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
data = b""
try:
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    body = data.partition(b"\r\n\r\n")[2]
    if mode not in ("connect",) and status.split()[1:2] == ["200"]:
        while chunk := s.recv(65536):
            body += chunk
    print(json.dumps({"status": status, "body_len": len(body)}))
except OSError as e:
    print(json.dumps({"status": "closed " + str(e), "body_len": len(data)}))
'''


def test_each_rule_from_inside_the_guest(https: HttpServer, base_snapshot: Any,
                                         snapshot_store: Any) -> None:
    """Every rule, exercised by a client in the guest (the per-rule proxy tests in
    test_egress.py drive the same proxy from the host)."""
    with HttpServer("127.0.0.1", label="http-1") as plain, BlackHole("127.0.0.2") as dark:
        pins = {"pypi.test": "127.0.0.1", "a.example.test": "127.0.0.1",
                "example.test": "127.0.0.1", "private.test": "10.1.2.3",
                "meta.test": "169.254.169.254", "dark.test": "127.0.0.2",
                "loop.test": "127.0.0.1"}
        base = {"hosts": pins, "allow_ips": ["127.0.0.1/32"],
                "ports": [https.port, plain.port]}
        sb = Sandbox.from_snapshot(base_snapshot, store=snapshot_store,
                                   network=NetworkPolicy(allow=["pypi.test"], **base))
        try:
            sb.files.write("/tmp/probe.py", PROBE)

            def probe(host: str, port: int, mode: str = "connect") -> dict[str, Any]:
                r = sb.commands.run(["python3", "/tmp/probe.py", host, str(port), mode],
                                    timeout=60)
                return dict(json.loads(r.stdout))

            def status(host: str, port: int = https.port, mode: str = "connect") -> str:
                return str(probe(host, port, mode)["status"])

            assert status("pypi.test").startswith("HTTP/1.1 200")
            assert "not on this sandbox's allow list" in status("example.test")
            # wildcards: a subdomain, not the apex
            sb.network.set_policy(NetworkPolicy(allow=["*.example.test"], **base))
            assert status("a.example.test").startswith("HTTP/1.1 200")
            assert "403" in status("example.test")
            # IP literals, in any spelling
            for literal in ("127.0.0.1", "2130706433", "[::1]"):
                assert "IP literals are refused" in status(literal), literal
            # private, metadata and loopback addresses need allow_ips
            sb.network.set_policy(NetworkPolicy(
                allow=["private.test", "meta.test", "loop.test"], hosts=pins,
                ports=[https.port]))
            assert "private address" in status("private.test")
            assert "cloud metadata" in status("meta.test")
            assert "loopback address" in status("loop.test")
            # ports
            sb.network.set_policy(NetworkPolicy(allow=["pypi.test"], hosts=pins,
                                                allow_ips=["127.0.0.1/32"]))
            assert f"port {https.port} is not allowed" in status("pypi.test")
            # plain HTTP only when allowed
            sb.network.set_policy(NetworkPolicy(allow=["pypi.test"], **base))
            assert "plain HTTP is not allowed" in status("pypi.test", plain.port, "10")
            sb.network.set_policy(NetworkPolicy(allow=["pypi.test"], allow_http=True, **base))
            ok = probe("pypi.test", plain.port, "5000")
            assert ok["status"].startswith("HTTP/1.1 200") and ok["body_len"] == 5000
            # the byte cap, for the sandbox as a whole
            sb.network.set_policy(NetworkPolicy(allow=["pypi.test"], allow_http=True,
                                                max_bytes=sb.network._a._proxy.bytes_total
                                                + 100_000, **base))
            cut = probe("pypi.test", plain.port, "1000000")
            assert cut["body_len"] < 1_000_000
            assert "byte cap" in status("pypi.test")
            # connect timeout: an allowed address that never answers (a loopback
            # listener of this test's whose queue is full: the SYN goes unanswered)
            sb.network.set_policy(NetworkPolicy(
                allow=["dark.test"], hosts=pins, ports=[dark.port],
                allow_ips=["127.0.0.2/32"], connect_timeout=1.0))
            timed_out = status("dark.test", dark.port)
            assert timed_out.startswith("HTTP/1.1 504") and "timed out" in timed_out
            # a resolver that rebinds between calls cannot move a connection
            calls: list[str] = []

            async def rebinding(host: str, port: int) -> list[str]:
                calls.append(host)
                return ["127.0.0.1"] if len(calls) == 1 else ["10.9.9.9"]

            sb.network._a._proxy.resolver = rebinding
            sb.network.set_policy(NetworkPolicy(allow=["rebind.test"], ports=[https.port],
                                                allow_ips=["127.0.0.1/32"]))
            assert status("rebind.test").startswith("HTTP/1.1 200")
            assert "private address" in status("rebind.test")
            assert calls == ["rebind.test", "rebind.test"]  # once per connection
            events = sb.network.events()
            assert {"allow", "deny", "close"} <= {e.action for e in events}
        finally:
            sb.kill()


# many proxy connections at once from the guest: CONNECT on each, then read each answer
MANY = r'''
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    socks.append(s)
out = {}
for s in socks:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        key = " ".join(line.split()[:2]) + (" (256)" if "256 guest" in line else "")
    except OSError as e:
        key = type(e).__name__
    out[key] = out.get(key, 0) + 1
print(json.dumps(out), flush=True)
import time
time.sleep(600)  # hold them until killed
'''


def test_guest_connections_are_capped_per_sandbox(base_snapshot: Any,
                                                  snapshot_store: Any) -> None:
    """MAX_BRIDGES (256) guest connections served at once per sandbox, even when the
    policy's connection cap is higher: the rest get a 429 saying so, and none of them
    holds a host descriptor. All of them back once the workload lets go; the audit
    file is moved aside when the sandbox ends."""
    import time

    from sandvm.fds import BUDGET
    from sandvm.network import BRIDGE_FDS, MAX_BRIDGES

    hold = HoldServer()
    sb = Sandbox.from_snapshot(base_snapshot, store=snapshot_store, network=NetworkPolicy(
        allow=["hold.test"], hosts={"hold.test": "127.0.0.1"}, ports=[hold.port],
        allow_ips=["127.0.0.1/32"], max_connections=1000))
    try:
        sb.files.write("/tmp/many.py", MANY)
        h = sb.commands.run(["python3", "/tmp/many.py", "hold.test", str(hold.port), "300"],
                            background=True, timeout=600)
        deadline = time.monotonic() + 300
        while not h.stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        counts = json.loads(h.stdout)
        assert counts == {"HTTP/1.1 200": MAX_BRIDGES, "HTTP/1.1 429 (256)": 300 - MAX_BRIDGES}
        net = sb.network._a
        assert len(net._bridges) == MAX_BRIDGES
        assert BUDGET.held_by(sb.sandbox_id) == MAX_BRIDGES * BRIDGE_FDS  # pair + upstream
        h.kill()
        hold.close()  # the upstream ends too (a half-closed tunnel lives until idle)
        deadline = time.monotonic() + 60
        while (net._bridges or BUDGET.held_by(sb.sandbox_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not net._bridges and BUDGET.held_by(sb.sandbox_id) == 0
        path = sb.network.audit_path
        assert path is not None and path.exists()
    finally:
        sb.kill()
        hold.close()
    ended = path.parent / "ended" / path.name
    assert not path.exists() and ended.exists()
    # the 44 identical refusals: one record at once, one for the repeats (at the end)
    refusals = [json.loads(x) for x in ended.read_text().splitlines()
                if "256 guest connections" in x]
    assert [r["count"] for r in refusals] == [1, 300 - MAX_BRIDGES - 1]


def test_the_descriptor_budget_refuses_guest_connections_with_a_reason(
        base_snapshot: Any, snapshot_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest connection the process's descriptor budget does not cover gets a 503
    that says so (answered over the agent stream: no host descriptor spent), and is
    audited; one it covers works."""
    import time

    from sandvm import network
    from sandvm.fds import MIN_RESERVE, FdBudget

    tight = FdBudget(limit=MIN_RESERVE + 12)  # a share of 3: one bridge with its upstream
    monkeypatch.setattr(network, "BUDGET", tight)
    hold = HoldServer()
    sb = Sandbox.from_snapshot(base_snapshot, store=snapshot_store, network=NetworkPolicy(
        allow=["hold.test"], hosts={"hold.test": "127.0.0.1"}, ports=[hold.port],
        allow_ips=["127.0.0.1/32"]))
    try:
        sb.files.write("/tmp/many.py", MANY)
        h = sb.commands.run(["python3", "/tmp/many.py", "hold.test", str(hold.port), "3"],
                            background=True, timeout=600)
        deadline = time.monotonic() + 120
        while not h.stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert json.loads(h.stdout) == {"HTTP/1.1 200": 1, "HTTP/1.1 503": 2}
        assert tight.held_by(sb.sandbox_id) == 3
        refusal = [e for e in sb.network.events() if e.action == "error"][-1]
        assert "descriptors" in refusal.reason and "ulimit" not in refusal.reason
        h.kill()
        hold.close()
        deadline = time.monotonic() + 60
        while tight.held and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tight.held == 0
    finally:
        sb.kill()
        hold.close()
