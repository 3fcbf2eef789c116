"""The server's boundary without VMs: an in-process app (Starlette's TestClient, no
sockets) on a private state dir, journal and runtime dir.

What errors may tell a client (no host paths, no control characters, the detail in
the server's log under the request id), WebSockets refused without a key, and the
tenant caps that are checked before any VM is made (``max_pools``, ``max_fork``, a
pool's memory in the tenant's memory quota), on snapshots crafted on disk.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.websockets import WebSocket

from sandvm.errors import AgentDisconnected, GuestFileNotFound, SnapshotInUse, VmBootError
from sandvm.server import ServerConfig, ServerStore, create_app
from sandvm.snapshots import SnapshotStore

with warnings.catch_warnings():  # it would rather have httpx2, which is not installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

MANIFEST = {
    "sandvm_version": "0.1.0", "qemu_version": "QEMU emulator version 7.2.22",
    "machine": "microvm", "accelerator": "tcg", "cpu": "max", "kernel_release": "k",
    "created": 1.0, "source_id": "sb-x",
    "spec": {"image": "base", "memory_mib": 256, "vcpus": 1},
}


class App:
    """An app on its own state; ``alice``'s key; ``client`` is running (lifespan)."""

    def __init__(self, tmp: Path, client: TestClient, app: FastAPI, alice: str) -> None:
        self.tmp, self.client, self.app, self.alice = tmp, client, app, alice
        self.state = tmp / "state"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.alice}"}


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("SANDVM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SANDVM_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("SANDVM_JOURNAL", str(tmp_path / "journal.db"))
    monkeypatch.delenv("SANDVM_SERVER_DIR", raising=False)
    clients: list[TestClient] = []

    def make(**settings: Any) -> App:
        config = ServerConfig(state_dir=tmp_path / "state", **settings)
        store = ServerStore(config.state_dir)
        key = store.create_key("alice")
        store.close()
        app = create_app(config)
        client = TestClient(app, base_url="http://127.0.0.1")
        client.__enter__()  # runs the app's startup (the service)
        clients.append(client)
        return App(tmp_path, client, app, key)

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def fake_snapshot(app: App, tenant: str, name: str, *, memory_mib: int = 256) -> None:
    """A snapshot in the tenant's store on the server (files and manifest, no VM)."""
    store = SnapshotStore(app.state / "snapshots" / tenant)
    staging = store.staging(name)
    (staging / "state").write_bytes(b"QEVM device state")
    with open(staging / "mem", "wb") as f:
        f.truncate(1 << 20)
    store.commit(staging, name, {**MANIFEST, "spec": {**MANIFEST["spec"],
                                                      "memory_mib": memory_mib}})


# ---------------------------------------------------------------------------- errors


def test_errors_from_below_come_out_clean_and_the_log_has_the_detail(
        make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    a = make_app()
    console = a.tmp / "run" / "sandvm-0" / "sb-1" / "console.log"
    detail = (f"VM sb-1 did not become ready within 30 s.\n--- console tail ({console})"
              f" ---\n\x1b]0;owned\x07\x1b[2J\x00 mounting /etc/shadow from"
              f" {a.state}/snapshots/bob/secret/mem\u202e")

    @a.app.get("/v1/test-boom")
    async def boom() -> None:
        raise VmBootError(detail)

    @a.app.get("/v1/test-guest")
    async def guest() -> None:
        raise GuestFileNotFound(f"no such file: /root/data.txt (host {a.state}/server.db)")

    @a.app.get("/v1/test-in-use")
    async def in_use() -> None:
        raise SnapshotInUse("snapshot 's' is used by pool 'p': delete the pool first"
                            " (DELETE /v1/pools/NAME)")

    with caplog.at_level(logging.WARNING, logger="sandvm.server"):
        r = a.client.get("/v1/test-boom", headers=a.auth())
    assert r.status_code == 500 and r.json()["code"] == "vm_boot_failed"
    message = r.json()["message"]
    for leak in (str(a.tmp), "/etc/shadow", "/snapshots/", "console.log", "\x1b", "\x00",
                 "\x07", "\u202e", "\n"):
        assert leak not in message, (leak, message)
    assert "VM sb-1 did not become ready" in message and "<path>" in message
    assert "\\x1b" in message  # the escape is shown, not sent
    rid = r.headers["x-request-id"]
    assert rid.startswith("req-") and rid in message  # the client can quote it
    logged = "\n".join(rec.getMessage() for rec in caplog.records if rid in rec.getMessage())
    assert f"{a.state}/snapshots/bob/secret/mem" in logged and str(console) in logged
    assert "\x1b" not in logged and "\\x1b" in logged  # one log line each, escaped

    r = a.client.get("/v1/test-in-use", headers=a.auth())  # the API's paths stay
    assert r.status_code == 409
    assert r.json()["message"] == "snapshot 's' is used by pool 'p': delete the pool first" \
                                  " (DELETE /v1/pools/NAME)"
    r = a.client.get("/v1/test-guest", headers=a.auth())  # the guest's own paths stay
    assert r.status_code == 404
    assert "/root/data.txt" in r.json()["message"] and str(a.state) not in r.text


def test_a_background_commands_error_event_is_clean(make_app: Any) -> None:
    from sandvm.server.commands import BackgroundCommand

    a = make_app()
    svc = a.app.state.service

    class Gone:
        async def wait(self) -> None:
            raise AgentDisconnected(f"agent channel read failed: {a.tmp}/run/x.sock"
                                    " \x1b[31mbye\x00")

    async def run() -> dict[str, Any]:
        bg = BackgroundCommand(command_id="cmd-1", sandbox_id="sb-1", tenant="alice",
                               cmd="true", max_buffer=1024)
        bg.watch(Gone(), redactor=svc.redactor)  # type: ignore[arg-type]
        async for event in bg.follow(0):
            if event["type"] == "error":
                return event
        raise AssertionError("no error event")

    event = asyncio.run(run())
    assert event["code"] == "agent_disconnected"
    assert str(a.tmp) not in event["message"] and "x.sock" not in event["message"]
    assert "\x1b" not in event["message"] and "\x00" not in event["message"]


# ---------------------------------------------------------------------------- websockets


def test_websockets_need_a_key_on_every_path(make_app: Any) -> None:
    a = make_app()

    @a.app.websocket("/v1/test-ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(f"tenant {websocket.scope.get('sandvm.tenant')}")
        await websocket.close()

    for path in ("/v1/test-ws", "/v1/nothing-here", "/health", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer sandvm_wrong"},
                        {"Authorization": "Basic x"}):
            with pytest.raises(WebSocketDenialResponse) as ei, \
                    a.client.websocket_connect(path, headers=headers) as conn:
                conn.receive_text()  # never reached: refused before it opens
            assert ei.value.status_code == 401, (path, headers)
            assert ei.value.json()["code"] == "unauthenticated"
    # a server without the denial-response extension: closed (1008) before it opens
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/test-ws", "raw_path": b"/v1/test-ws",
             "headers": [], "query_string": b"", "scheme": "ws", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "subprotocols": [],
             "asgi": {"version": "3.0"}, "sandvm.tenant": "alice"}  # forged: dropped
    asyncio.run(a.app(scope, receive, send))  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "unauthenticated"}]
    with pytest.raises(RuntimeError, match="serves no"):  # other kinds: never let through
        asyncio.run(a.app({**scope, "type": "webtransport"}, receive, send))  # type: ignore[arg-type]
    with a.client.websocket_connect("/v1/test-ws", headers=a.auth()) as conn:
        assert conn.receive_text() == "tenant alice"


# ---------------------------------------------------------------------------- caps


def test_max_pools_caps_a_tenants_pools(make_app: Any) -> None:
    a = make_app(max_pools=2)
    fake_snapshot(a, "alice", "base")
    for name in ("p1", "p2"):
        r = a.client.post("/v1/pools", headers=a.auth(), json={
            "name": name, "snapshot": "base", "min_size": 0, "max_size": 1})
        assert r.status_code == 201, r.text
    r = a.client.post("/v1/pools", headers=a.auth(), json={
        "name": "p3", "snapshot": "base", "min_size": 0, "max_size": 1})
    assert (r.status_code, r.json()["code"]) == (429, "quota_exceeded")
    assert "2 pools" in r.json()["message"]
    names = [p["name"] for p in a.client.get("/v1/pools", headers=a.auth()).json()["pools"]]
    assert names == ["p1", "p2"]
    assert a.client.delete("/v1/pools/p1", headers=a.auth()).status_code == 204
    r = a.client.post("/v1/pools", headers=a.auth(), json={
        "name": "p3", "snapshot": "base", "min_size": 0, "max_size": 1})
    assert r.status_code == 201, r.text  # a deleted pool frees its place


def test_max_fork_caps_the_copies_of_one_fork(make_app: Any) -> None:
    a = make_app(max_fork=3)
    r = a.client.post("/v1/sandboxes/sb-none/fork", headers=a.auth(), json={"n": 4})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_spec")
    assert "1 to 3 copies" in r.json()["message"]
    r = a.client.post("/v1/sandboxes/sb-none/fork", headers=a.auth(), json={"n": 3})
    assert (r.status_code, r.json()["code"]) == (404, "vm_not_found")  # n was fine


def test_pool_memory_counts_in_the_tenants_memory_quota(make_app: Any) -> None:
    a = make_app(max_tenant_memory_mib=700)
    fake_snapshot(a, "alice", "base", memory_mib=256)
    r = a.client.post("/v1/pools", headers=a.auth(), json={
        "name": "big", "snapshot": "base", "min_size": 0, "max_size": 3})  # 768 MiB
    assert (r.status_code, r.json()["code"]) == (429, "quota_exceeded")
    assert "memory quota of 700 MiB" in r.json()["message"]
    r = a.client.post("/v1/pools", headers=a.auth(), json={
        "name": "two", "snapshot": "base", "min_size": 0, "max_size": 2})  # 512 MiB
    assert r.status_code == 201, r.text
    # the pool holds 512 of 700 MiB: a 256 MiB sandbox is refused before it boots,
    # and so is a second pool of one
    r = a.client.post("/v1/sandboxes", headers=a.auth(), json={"memory_mib": 256})
    assert (r.status_code, r.json()["code"]) == (429, "quota_exceeded"), r.text
    assert "memory quota" in r.json()["message"]
    r = a.client.post("/v1/pools", headers=a.auth(), json={
        "name": "one", "snapshot": "base", "min_size": 0, "max_size": 1})
    assert (r.status_code, r.json()["code"]) == (429, "quota_exceeded")
    r = a.client.post("/v1/sandboxes", headers=a.auth(), json={"snapshot": "base"})
    assert (r.status_code, r.json()["code"]) == (429, "quota_exceeded"), r.text
    assert a.client.delete("/v1/pools/two", headers=a.auth()).status_code == 204
    r = a.client.post("/v1/pools", headers=a.auth(), json={
        "name": "one", "snapshot": "base", "min_size": 0, "max_size": 2})
    assert r.status_code == 201, r.text  # deleting the pool gave its memory back
