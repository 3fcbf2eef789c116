"""`sandvm serve --provider memory`: the server's API on the in-memory fake, no QEMU.

The fake's sandboxes are in-process VMs whose guest answers only what setting a
sandbox up needs (``sandvm.providers.memory``): enough for what the server itself
decides (tenancy, quotas, listing, kill, TTLs, request validation), which these tests
check without booting a VM. The conformance test runs the same API checks on the fake
and (marked ``qemu``, one boot) on QEMU, so the fake cannot drift from the real thing.
What the fake cannot do is refused with a clear error, never a crash or a hang.

Servers are subprocesses as users run them (``ServerProc`` of test_server), one per
module and provider; quota 2 sandboxes per tenant.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandvm import (
    GuestError,
    NetworkPolicy,
    QuotaExceeded,
    SandboxStateError,
    UnknownImage,
)
from sandvm.client import Sandbox
from sandvm.server import ServerStore
from test_server import ServerProc, _auth

MAX_TTL = 600
TENANTS: dict[str, tuple[str, str]] = {}  # per server: the conformance test's two tenants


def _serve(tmp: Path, provider: str) -> ServerProc:
    """A server on ``provider`` (not started), with the keys of alice and bob (made in
    its store here: test_server checks `sandvm key`, and each CLI run costs seconds)."""
    srv = ServerProc(tmp, extra=("--provider", provider, "--max-ttl", str(MAX_TTL)))
    store = ServerStore(tmp / "state")
    srv.alice = store.create_key("alice")
    srv.bob = store.create_key("bob-laptop", tenant="bob")
    TENANTS[str(tmp)] = (store.create_key("carol"), store.create_key("dave"))
    store.close()
    return srv


@pytest.fixture(scope="module", params=[
    "memory", pytest.param("qemu", marks=pytest.mark.qemu)])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[ServerProc]:
    """A server on each provider (the same checks run on both; the fake's is ``server``)."""
    if request.param == "memory":
        yield request.getfixturevalue("server")
        return
    srv = _serve(tmp_path_factory.mktemp(f"api-{request.param}"), request.param)
    with srv.running():
        yield srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server on the fake, for the tests of server logic moved off QEMU."""
    srv = _serve(tmp_path_factory.mktemp("fake"), "memory")
    with srv.running():
        yield srv


@pytest.fixture(scope="module")
def alice_sb(server: ServerProc) -> Iterator[Sandbox]:
    sb = Sandbox.create(api_key=server.alice, url=server.url, timeout=600)
    yield sb
    sb.kill()


# ---------------------------------------------------------------------------- conformance


def test_the_api_decides_the_same_on_both_providers(api: ServerProc) -> None:
    """One sandbox's life through the API: what the server decides (ownership, 404 for
    anyone else, validation, TTL, kill, listing) is the same on the fake and on QEMU."""
    a, b = (_auth(k) for k in TENANTS[str(api.tmp)])
    with httpx.Client(base_url=api.url, timeout=120) as c:
        # request validation, before any VM
        r = c.post("/v1/sandboxes", headers=a, json={"timeout": MAX_TTL + 1})
        assert (r.status_code, r.json()["code"]) == (400, "invalid_spec"), r.text
        r = c.post("/v1/sandboxes", headers=a, json={"vcpus": 0})
        assert (r.status_code, r.json()["code"]) == (422, "invalid_spec"), r.text
        r = c.post("/v1/sandboxes", headers=a, json={"image": "no-such-image"})
        assert (r.status_code, r.json()["code"]) == (400, "unknown_image"), r.text
        assert c.get("/v1/sandboxes", headers=a).json() == {"sandboxes": []}

        r = c.post("/v1/sandboxes", headers=a, json={"timeout": 300, "memory_mib": 256})
        assert r.status_code == 201, r.text
        info = r.json()
        sid = info["sandbox_id"]
        assert (info["state"], info["image"], info["memory_mib"], info["vcpus"],
                info["network"]) == ("running", "base", 256, 1, False)
        assert info["expires_at"] > time.time() + 250
        assert [s["sandbox_id"] for s in c.get("/v1/sandboxes", headers=a).json()[
            "sandboxes"]] == [sid]
        assert c.get(f"/v1/sandboxes/{sid}", headers=a).json()["sandbox_id"] == sid
        assert c.get(f"/v1/sandboxes/{sid}/ping", headers=a).status_code == 200
        assert c.post(f"/v1/sandboxes/{sid}/pause", headers=a).status_code == 204
        assert c.post(f"/v1/sandboxes/{sid}/resume", headers=a).status_code == 204

        # another tenant's sandbox, a made-up id and a malformed one are all 404
        for who, path in ((b, f"/v1/sandboxes/{sid}"), (a, "/v1/sandboxes/sb-0000000000"),
                          (a, "/v1/sandboxes/not!an!id")):
            for method in ("GET", "DELETE"):
                r = c.request(method, path, headers=who)
                assert (r.status_code, r.json()["code"]) == (404, "vm_not_found"), r.text
        assert c.get("/v1/sandboxes", headers=b).json() == {"sandboxes": []}

        # the TTL: extended within the server's cap, refused over it
        r = c.post(f"/v1/sandboxes/{sid}/timeout", headers=a, json={"timeout": 500})
        assert r.status_code == 200 and r.json()["expires_at"] > time.time() + 450
        r = c.post(f"/v1/sandboxes/{sid}/timeout", headers=a, json={"timeout": MAX_TTL + 1})
        assert (r.status_code, r.json()["code"]) == (400, "invalid_spec")
        r = c.post(f"/v1/sandboxes/{sid}/timeout", headers=b, json={"timeout": 100})
        assert r.status_code == 404

        # kill: the owner then sees it ended (409), and it is no longer listed
        assert c.delete(f"/v1/sandboxes/{sid}", headers=a).status_code == 204
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/ping")):
            r = c.request(method, f"/v1/sandboxes/{sid}{path}", headers=a)
            assert (r.status_code, r.json()["code"]) == (409, "sandbox_state"), r.text
        assert c.get("/v1/sandboxes", headers=a).json() == {"sandboxes": []}
        assert c.get(f"/v1/sandboxes/{sid}", headers=b).status_code == 404


# ---------------------------------------------------------------------------- the fake


def test_what_the_fake_cannot_do_is_refused_clearly(server: ServerProc,
                                                    alice_sb: Sandbox) -> None:
    """Commands and files: the fake guest's GuestError (400) naming the op; snapshots,
    forks and restores: Unsupported (501). The sandbox runs on afterwards."""
    a = _auth(server.alice)
    sid = alice_sb.sandbox_id
    with pytest.raises(GuestError, match="in-memory fake's guest does not run 'exec'"):
        alice_sb.commands.run("true")
    with pytest.raises(GuestError, match="does not run 'read_file'"):
        alice_sb.files.read("/etc/hostname")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path, body in ((f"/v1/sandboxes/{sid}/snapshots", {"name": "s1"}),
                           (f"/v1/sandboxes/{sid}/fork", {"n": 1})):
            r = c.post(path, headers=a, json=body)
            assert (r.status_code, r.json()["code"]) == (501, "unsupported"), r.text
            assert "QEMU" in r.json()["message"]
        r = c.get("/v1/snapshots", headers=a)
        assert r.status_code == 200 and r.json() == {"snapshots": []}
    assert alice_sb.is_running()


def test_every_operation_answers_a_documented_status_on_the_fake(memory_app: Any) -> None:
    """Every operation of the OpenAPI document (test_server's REQUESTS), on a fake
    sandbox: a status the document declares for it, never a 500 (what the fake cannot
    do is 400 guest_error or 501 unsupported), and the sandbox runs on."""
    import json

    from test_server import REPO, REQUESTS

    doc = json.loads((REPO / "docs" / "openapi.json").read_text())
    client, keys = memory_app()
    a = _auth(keys["alice"])
    r = client.post("/v1/sandboxes", headers=a, json={})
    assert r.status_code == 201, r.text
    sid = r.json()["sandbox_id"]
    kill = ("DELETE", "/v1/sandboxes/{sandbox_id}")
    for method, path in [*(op for op in REQUESTS if op != kill), kill]:
        url = path.replace("{sandbox_id}", sid).replace(
            "{command_id}", "cmd-0000000000").replace("{port}", "8000").replace(
            "{name}", "nothing")
        r = client.request(method, url, headers=a, **REQUESTS[(method, path)])
        declared = doc["paths"][path][method.lower()]["responses"]
        assert str(r.status_code) in declared and r.status_code != 500, \
            (method, path, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json()["code"] in ("guest_error", "unsupported", "vm_not_found",
                                        "unknown_command", "snapshot_not_found",
                                        "pool_not_found", "sandbox_state", "port_timeout",
                                        "invalid_spec"), (method, path, r.text)
        if (method, path) != kill:
            assert client.get(f"/v1/sandboxes/{sid}", headers=a).status_code == 200, \
                (method, path)


def test_a_fake_sandbox_ends_with_its_server(memory_app: Any) -> None:
    """The fake's sandboxes live in the server's process: stopping it ends them (no
    keeper to detach to), and the next server on the same state says so (409, not a
    hang). In-process servers (the ``memory_app`` fixture)."""
    client, keys = memory_app()
    a = _auth(keys["alice"])
    r = client.post("/v1/sandboxes", headers=a, json={})
    assert r.status_code == 201, r.text
    sid = r.json()["sandbox_id"]
    client.__exit__(None, None, None)  # the server stops
    client, keys = memory_app()
    a = _auth(keys["alice"])
    r = client.get(f"/v1/sandboxes/{sid}", headers=a)
    assert (r.status_code, r.json()["code"]) == (409, "sandbox_state"), r.text
    assert client.get("/v1/sandboxes", headers=a).json() == {"sandboxes": []}


def test_restores_and_pools_are_refused_on_the_fake(memory_app: Any, tmp_path: Path) -> None:
    """A snapshot (crafted on disk: the fake cannot take one) cannot be restored on the
    fake: a sandbox from it and a pool of it are 501 ``unsupported``, nothing is kept."""
    from sandvm.snapshots import SnapshotStore
    from test_server_boundary import MANIFEST

    client, keys = memory_app()
    a = _auth(keys["alice"])
    store = SnapshotStore(tmp_path / "state" / "snapshots" / "alice")
    staging = store.staging("snap")
    (staging / "state").write_bytes(b"QEVM device state")
    (staging / "mem").write_bytes(b"\0" * 4096)
    store.commit(staging, "snap", MANIFEST)
    for path, body in (("/v1/sandboxes", {"snapshot": "snap"}),
                       ("/v1/pools", {"name": "p", "snapshot": "snap", "min_size": 1})):
        r = client.post(path, headers=a, json=body)
        assert (r.status_code, r.json()["code"]) == (501, "unsupported"), r.text
    assert client.get("/v1/pools", headers=a).json() == {"pools": []}
    assert client.get("/v1/sandboxes", headers=a).json() == {"sandboxes": []}


# ---------------------------------------------------------------------------- quota, TTL
# (moved from test_server: the VMs only stood in for the server's bookkeeping)


def test_quota_kill_and_ttl_free_slots(server: ServerProc, alice_sb: Sandbox) -> None:
    key: str = server.alice
    second = Sandbox.create(api_key=key, url=server.url)
    with pytest.raises(QuotaExceeded):  # alice_sb and second: quota 2
        Sandbox.create(api_key=key, url=server.url)
    r = httpx.post(server.url + "/v1/sandboxes", headers=_auth(key), json={})
    assert r.status_code == 429 and r.json()["code"] == "quota_exceeded"
    second.kill()
    with pytest.raises(SandboxStateError):
        second.commands.run("true")
    h = _auth(key)
    r = httpx.get(f"{server.url}/v1/sandboxes/{second.sandbox_id}", headers=h)
    assert r.status_code == 409 and r.json()["code"] == "sandbox_state"  # the owner: ended
    r = httpx.get(f"{server.url}/v1/sandboxes/{second.sandbox_id}",
                  headers=_auth(server.bob))
    assert r.status_code == 404  # anyone else: never existed
    third = Sandbox.create(api_key=key, url=server.url, timeout=2,  # the killed one's slot
                           network=NetworkPolicy(allow=["example.com"]))
    assert third.get_info().network
    deadline = time.monotonic() + 20
    while third.is_running() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not third.is_running()  # its TTL ended it
    with pytest.raises(SandboxStateError):
        third.commands.run("true")
    assert third.sandbox_id not in [i.sandbox_id for i in Sandbox.list(api_key=key,
                                                                        url=server.url)]
    with pytest.raises(UnknownImage):  # past the quota check: the TTL freed a slot
        Sandbox.create(api_key=key, url=server.url, image="no-such-image")
