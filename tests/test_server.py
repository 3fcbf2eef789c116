"""`sandvm serve` as users run it (a subprocess on 127.0.0.1), through the real client.

One server for the module (state dir and journal private to it, quota 2 sandboxes per
tenant, uploads capped at 4 MiB) and one sandbox of tenant alice that most tests share;
bob is another tenant. The auth suite tries every operation of the OpenAPI document
with no key, wrong keys and bob's key. The restart test stops the server (SIGTERM,
then SIGKILL) and starts it again on the same port.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandvm import (
    CommandExitError,
    CommandNotFound,
    CommandTimeout,
    GuestError,
    GuestFileNotFound,
    InvalidSpec,
    RequestTooLarge,
    Unauthenticated,
    VmNotFound,
)
from sandvm.client import Pool, Sandbox, SnapshotStore

pytestmark = pytest.mark.qemu
SANDVM = str(Path(sys.executable).parent / "sandvm")
REPO = Path(__file__).resolve().parents[1]
UPLOAD_CAP = 4 << 20


class ServerProc:
    """`sandvm serve` in a subprocess; its stderr goes to a file we read the port from."""

    def __init__(self, tmp: Path, *, max_sandboxes: int = 2,
                 extra: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.max_sandboxes = max_sandboxes
        self.extra = extra  # more `sandvm serve` options
        self.env = {**os.environ, "SANDVM_SERVER_DIR": str(tmp / "state"),
                    "SANDVM_JOURNAL": str(tmp / "journal.db")}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "server.log"
        self.alice = ""  # API keys of tenants alice and bob
        self.bob = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SANDVM, *args], capture_output=True, text=True, env=self.env,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            start = log.tell()
            self.proc = subprocess.Popen(
                [SANDVM, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--max-sandboxes", str(self.max_sandboxes), "--max-upload", str(UPLOAD_CAP),
                 "--log-level", "warning", *self.extra],
                env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[start:].decode(errors="replace")
            if "serving on http://" in text:
                self.port = int(text.split("serving on http://127.0.0.1:")[1].split()[0])
                break
            assert self.proc.poll() is None, text
            time.sleep(0.05)
        while time.monotonic() < deadline:  # listening: wait for the app's startup
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server did not start: {self.log.read_text()}")

    def key(self, name: str, tenant: str | None = None) -> str:
        """A new API key ``name`` (of ``tenant``, default the name), from the CLI."""
        r = self.cli("key", "create", name, *(("--tenant", tenant) if tenant else ()))
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    @contextmanager
    def running(self) -> Iterator[ServerProc]:
        """Started for the block; then stopped, and every sandbox it made killed."""
        self.start()
        try:
            yield self
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
            self.kill_sandboxes()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def kill_sandboxes(self) -> None:
        import asyncio

        from sandvm.runtime.journal import Journal
        from sandvm.runtime.manager import SandboxManager

        m = SandboxManager(Journal(self.tmp / "journal.db"))
        for info in m.ls():
            asyncio.run(m.kill(info.sandbox_id))
        m.journal.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(tmp_path_factory.mktemp("server"))
    srv.alice = srv.key("alice")
    srv.bob = srv.key("bob-laptop", "bob")
    with srv.running():
        yield srv


@pytest.fixture(scope="module")
def alice_sb(server: ServerProc) -> Iterator[Sandbox]:
    sb = Sandbox.create(api_key=server.alice, url=server.url,
                        timeout=600)
    yield sb
    sb.kill()


def until(pred: object, what: str, timeout: float = 30.0) -> None:
    """Wait until ``pred()`` is true; fail saying ``what`` did not happen in time."""
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------- keys, CLI


def test_key_cli_never_shows_keys_and_stores_them_private(server: ServerProc) -> None:
    ls = server.cli("key", "ls", "--json")
    keys = json.loads(ls.stdout)
    assert {(k["name"], k["tenant"]) for k in keys} >= {("alice", "alice"),
                                                        ("bob-laptop", "bob")}
    assert server.alice not in ls.stdout + server.cli("key", "ls").stdout
    db = server.tmp / "state" / "server.db"
    assert db.stat().st_mode & 0o777 == 0o600
    assert (server.tmp / "state").stat().st_mode & 0o777 == 0o700
    assert server.alice.encode() not in db.read_bytes()
    assert server.cli("key", "create", "alice").returncode == 2  # name taken
    assert server.cli("key", "create", "../x").returncode == 2
    assert server.cli("key", "revoke", "nobody").returncode == 1


def test_health_is_open_and_metrics_need_a_key(server: ServerProc) -> None:
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    r = httpx.get(server.url + "/metrics", headers=_auth(server.alice))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("sandvm_http_requests_total", "sandvm_sandboxes_live",
                 "sandvm_auth_failures_total", "# TYPE sandvm_command_duration_seconds"):
        assert name in r.text
    assert 'route="/metrics"' in r.text and "sb-" not in r.text


def test_openapi_served_equals_committed(server: ServerProc) -> None:
    from sandvm.server import openapi_document

    committed = (REPO / "docs" / "openapi.json").read_text()
    assert openapi_document() == committed, \
        "docs/openapi.json is stale: run `python -m sandvm.server.openapi`"
    served = httpx.get(server.url + "/openapi.json")
    assert served.status_code == 200
    assert served.json() == json.loads(committed)


# ---------------------------------------------------------------------------- the client


def test_commands_stream_and_results(alice_sb: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    r = alice_sb.commands.run("echo one; sleep 1; echo two; echo err >&2; printf '\\377'",
                              on_stdout=lambda s: seen.append((time.monotonic() - t0, s)))
    done = time.monotonic() - t0
    assert r.exit_code == 0 and r.stdout_bytes == b"one\ntwo\n\xff"
    assert r.stderr == "err\n"
    assert seen[0][1] == "one\n" and done - seen[0][0] > 0.8, seen  # streamed, not at the end
    r = alice_sb.commands.run(["sh", "-c", 'echo "$A $(pwd)"; cat'], env={"A": "1"},
                              cwd="/tmp", stdin=b"in\x00put")
    assert r.stdout_bytes == b"1 /tmp\nin\x00put"
    with pytest.raises(CommandExitError) as ei:
        alice_sb.commands.run("echo bad >&2; exit 3")
    assert ei.value.exit_code == 3 and ei.value.stderr == "bad\n"
    assert alice_sb.commands.run("exit 4", check=False).exit_code == 4
    with pytest.raises(CommandTimeout) as ti:
        alice_sb.commands.run("sleep 30", timeout=1)
    assert ti.value.result is not None and ti.value.result.timed_out
    with pytest.raises(CommandNotFound):
        alice_sb.commands.run(["no-such-binary"])
    assert alice_sb.commands.run("true", timeout=7 * 86400).exit_code == 0  # the cap works
    with pytest.raises(InvalidSpec):  # past it: the guest agent cannot arm such a timer
        alice_sb.commands.run("true", timeout=1e10)


def test_files_round_trip_and_errors(alice_sb: Sandbox) -> None:
    data = secrets.token_bytes(3 << 20)
    assert alice_sb.files.write("/root/dir/blob", data).size == len(data)
    assert alice_sb.files.read("/root/dir/blob", format="bytes") == data
    alice_sb.files.write("/root/t.txt", "héllo", mode=0o600)
    assert alice_sb.files.read("/root/t.txt") == "héllo"
    assert alice_sb.commands.run("stat -c %a /root/t.txt").stdout == "600\n"
    with pytest.raises(GuestFileNotFound):
        alice_sb.files.read("/root/none")
    with pytest.raises(GuestFileNotFound):
        alice_sb.files.write("/root/no/such/dir/f", b"x", make_parents=False)
    from sandvm import FileTooLarge, InvalidPath

    with pytest.raises(FileTooLarge):
        alice_sb.files.read("/root/dir/blob", max_bytes=1000)
    with pytest.raises(InvalidPath):
        alice_sb.files.read("relative")
    with pytest.raises(GuestError, match="directory"):  # as the local API says it
        alice_sb.files.read("/root/dir")
    with pytest.raises(RequestTooLarge):
        alice_sb.files.write("/root/too-big", b"x" * (UPLOAD_CAP + 1))
    assert alice_sb.commands.run("test -e /root/too-big", check=False).exit_code == 1


def test_upload_cap_holds_without_content_length(server: ServerProc, alice_sb: Sandbox
                                                 ) -> None:
    def body() -> Iterator[bytes]:  # chunked: the server counts as it streams
        for _ in range(5):
            yield b"y" * (1 << 20)

    r = httpx.put(f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/files",
                  params={"path": "/root/chunked"}, content=body(),
                  headers=_auth(server.alice))
    assert r.status_code == 413 and r.json()["code"] == "request_too_large"
    assert alice_sb.commands.run("test -e /root/chunked", check=False).exit_code == 1


def test_request_caps_and_validation(server: ServerProc, alice_sb: Sandbox) -> None:
    h = _auth(server.alice)
    cmds = f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/commands"
    r = httpx.post(cmds, headers=h, json={"cmd": "true", "stdin": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["code"] == "request_too_large"
    r = httpx.post(cmds, headers={**h, "X-Junk": "j" * (20 << 10)}, json={"cmd": "true"})
    assert r.status_code == 431 and r.json()["code"] == "request_too_large"
    r = httpx.post(cmds, headers=h, json={"cmd": "true", "surprise": 1})
    assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
    r = httpx.post(cmds, headers=h, content=b"{not json", )
    assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
    r = httpx.post(f"{server.url}/v1/sandboxes", headers=h, json={"image": "oci:/etc"})
    assert r.status_code == 422  # image sources (host paths) are not for API clients
    with pytest.raises(InvalidSpec):  # over this server's cap (4096 MiB): refused before a boot
        Sandbox.create(api_key=server.alice, url=server.url, memory_mib=8192)
    r = httpx.get(f"{server.url}/v1/nothing-here", headers=h)
    assert r.status_code == 404 and r.json()["code"] == "service_error"
    r = httpx.request("TRACE", f"{server.url}/v1/sandboxes", headers=h)  # schemathesis:
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"  # RFC 9110's Allow
    r = httpx.post(f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/timeout", headers=h,
                   json={"timeout": "600"})  # no coercion: a string is not seconds
    assert r.status_code == 422 and r.json()["code"] == "invalid_spec"


def test_client_disconnect_kills_the_command(server: ServerProc, alice_sb: Sandbox) -> None:
    url = f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/commands"
    with httpx.stream("POST", url, headers=_auth(server.alice),
                      json={"cmd": "echo $$ > /tmp/victim; echo go; sleep 60"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held: a dropped iterator closes the response
        first = json.loads(next(lines))
        assert first == {"type": "stdout", "text": "go\n"}
        assert alice_sb.commands.run("kill -0 $(cat /tmp/victim)").exit_code == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if alice_sb.commands.run("kill -0 $(cat /tmp/victim)", check=False).exit_code:
            return
        time.sleep(0.2)
    raise AssertionError("the command kept running after its client went away")


def test_set_timeout_and_connect(server: ServerProc, alice_sb: Sandbox) -> None:
    before = alice_sb.get_info().expires_at
    alice_sb.set_timeout(900)
    info = alice_sb.get_info()
    assert info.expires_at is not None and before is not None and info.expires_at > before
    with pytest.raises(InvalidSpec):
        alice_sb.set_timeout(10 ** 9)
    again = Sandbox.connect(alice_sb.sandbox_id, api_key=server.alice,
                            url=server.url)
    assert again.commands.run("echo same").stdout == "same\n"
    again.close()  # the HTTP connection only: the sandbox runs on
    assert alice_sb.is_running()


def test_env_vars_name_server_and_key(server: ServerProc, alice_sb: Sandbox,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDVM_URL", server.url)
    monkeypatch.setenv("SANDVM_API_KEY", server.alice)
    ids = [i.sandbox_id for i in Sandbox.list()]
    assert alice_sb.sandbox_id in ids
    monkeypatch.setenv("SANDVM_API_KEY", server.bob)
    assert alice_sb.sandbox_id not in [i.sandbox_id for i in Sandbox.list()]
    with pytest.raises(VmNotFound):
        Sandbox.connect(alice_sb.sandbox_id)
    monkeypatch.delenv("SANDVM_API_KEY")
    with pytest.raises(Unauthenticated):
        Sandbox.connect(alice_sb.sandbox_id)


# ---------------------------------------------------------------------------- auth suite

# a request each operation accepts when the key is right (None: the sandbox-id-less ones)
REQUESTS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/metrics"): {},
    ("POST", "/v1/sandboxes"): {"json": {"memory_mib": 256}},
    ("GET", "/v1/sandboxes"): {},
    ("GET", "/v1/sandboxes/{sandbox_id}"): {},
    ("DELETE", "/v1/sandboxes/{sandbox_id}"): {},
    ("POST", "/v1/sandboxes/{sandbox_id}/timeout"): {"json": {"timeout": 600}},
    ("POST", "/v1/sandboxes/{sandbox_id}/commands"): {"json": {"cmd": "touch /tmp/pwned"}},
    ("PUT", "/v1/sandboxes/{sandbox_id}/files"): {"params": {"path": "/tmp/pwned"},
                                                  "content": b"x"},
    ("GET", "/v1/sandboxes/{sandbox_id}/files"): {"params": {"path": "/etc/hostname"}},
    ("DELETE", "/v1/sandboxes/{sandbox_id}/files"): {"params": {"path": "/etc/hostname"}},
    ("GET", "/v1/sandboxes/{sandbox_id}/files/list"): {"params": {"path": "/etc"}},
    ("GET", "/v1/sandboxes/{sandbox_id}/files/stat"): {"params": {"path": "/etc"}},
    ("GET", "/v1/sandboxes/{sandbox_id}/files/exists"): {"params": {"path": "/etc"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/files/dir"): {"json": {"path": "/tmp/pwned"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/files/rename"): {
        "json": {"old_path": "/etc/hostname", "new_path": "/tmp/pwned"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/files/chown"): {
        "json": {"path": "/etc/hostname", "user": "65534"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/files/tmpfs"): {"json": {"path": "/tmp/pwned"}},
    ("PUT", "/v1/sandboxes/{sandbox_id}/files/tree"): {"params": {"path": "/tmp/pwned"},
                                                       "content": bytes(1024)},
    ("GET", "/v1/sandboxes/{sandbox_id}/files/tree"): {"params": {"path": "/etc"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/pause"): {},
    ("POST", "/v1/sandboxes/{sandbox_id}/resume"): {},
    ("GET", "/v1/sandboxes/{sandbox_id}/ping"): {},
    ("GET", "/v1/sandboxes/{sandbox_id}/stats"): {"params": {"pid": 1}},
    ("POST", "/v1/sandboxes/{sandbox_id}/commands/start"): {
        "json": {"cmd": "touch /tmp/pwned"}},
    ("GET", "/v1/sandboxes/{sandbox_id}/commands"): {},
    ("GET", "/v1/sandboxes/{sandbox_id}/commands/{command_id}"): {},
    ("GET", "/v1/sandboxes/{sandbox_id}/commands/{command_id}/output"): {
        "params": {"follow": "false"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin"): {
        "content": b"touch /tmp/pwned\n"},
    ("POST", "/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin/close"): {},
    ("POST", "/v1/sandboxes/{sandbox_id}/commands/{command_id}/signal"): {
        "json": {"signal": "SIGKILL"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/ports"): {"json": {"port": 8000}},
    ("GET", "/v1/sandboxes/{sandbox_id}/ports"): {},
    ("DELETE", "/v1/sandboxes/{sandbox_id}/ports/{port}"): {},
    ("POST", "/v1/sandboxes/{sandbox_id}/ports/{port}/wait"): {"json": {"timeout": 1}},
    ("GET", "/v1/sandboxes/{sandbox_id}/network"): {},
    ("PUT", "/v1/sandboxes/{sandbox_id}/network"): {"json": {"allow": ["example.com"]}},
    ("GET", "/v1/sandboxes/{sandbox_id}/network/events"): {},
    ("POST", "/v1/sandboxes/{sandbox_id}/snapshots"): {"json": {"name": "pwned"}},
    ("POST", "/v1/sandboxes/{sandbox_id}/fork"): {"json": {"n": 1}},
    ("GET", "/v1/snapshots"): {},
    ("GET", "/v1/snapshots/{name}"): {},
    ("DELETE", "/v1/snapshots/{name}"): {},
    ("POST", "/v1/pools"): {"json": {"name": "pwned", "snapshot": "authsuite"}},
    ("GET", "/v1/pools"): {},
    ("GET", "/v1/pools/{name}"): {},
    ("DELETE", "/v1/pools/{name}"): {},
}
PUBLIC = {("GET", "/health")}
# what another tenant gets for alice's snapshot or pool (the same as for none at all)
FOREIGN = {("GET", "/v1/snapshots/{name}"): "snapshot_not_found",
           ("DELETE", "/v1/snapshots/{name}"): "snapshot_not_found",
           ("POST", "/v1/pools"): "snapshot_not_found",
           ("GET", "/v1/pools/{name}"): "pool_not_found",
           ("DELETE", "/v1/pools/{name}"): "pool_not_found"}


def test_every_operation_refuses_missing_wrong_and_foreign_keys(
        server: ServerProc, alice_sb: Sandbox) -> None:
    doc = json.loads((REPO / "docs" / "openapi.json").read_text())
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == set(REQUESTS) | PUBLIC, "a new endpoint: add it to REQUESTS"
    shell = alice_sb.commands.run("sh", background=True)  # a target for the command ops
    alice_sb.snapshot("authsuite")  # targets for the snapshot and pool ops
    alice_pool = Pool.create(name="authsuite", snapshot="authsuite", min_size=0,
                             api_key=server.alice, url=server.url)
    revoked = server.cli("key", "create", "gone").stdout.strip().splitlines()[-1]
    assert server.cli("key", "revoke", "gone").returncode == 0
    bad_keys = {
        "missing": {},
        "unknown": _auth("sandvm_" + secrets.token_urlsafe(32)),
        "revoked": _auth(revoked),
        "malformed": {"Authorization": "Basic YWxpY2U6eA=="},
        "empty": {"Authorization": "Bearer"},
        "huge": _auth("sandvm_" + "a" * 5000),
    }
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for (method, path), kw in REQUESTS.items():
            url = path.replace("{sandbox_id}", alice_sb.sandbox_id).replace(
                "{command_id}", shell.command_id).replace("{port}", "8000").replace(
                "{name}", "authsuite")
            for what, headers in bad_keys.items():
                r = c.request(method, url, headers=headers, **kw)
                assert r.status_code == 401, (method, path, what, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert r.json()["code"] == "unauthenticated"
            if (method, path) in FOREIGN:
                r = c.request(method, url, headers=_auth(server.bob), **kw)
                assert (r.status_code, r.json()["code"]) == (
                    404, FOREIGN[(method, path)]), (method, path, r.text)
            if "{sandbox_id}" not in path:
                continue
            # another tenant's sandbox does not exist for bob: the same 404 as a made-up id
            r = c.request(method, url, headers=_auth(server.bob), **kw)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["code"] == "vm_not_found"
            fake = c.request(method, path.replace("{sandbox_id}", "sb-0000000000").replace(
                "{command_id}", shell.command_id).replace("{port}", "8000"),
                headers=_auth(server.bob), **kw)
            assert (fake.status_code, fake.json()["code"]) == (404, "vm_not_found")
        for body, code in (({"pool": "authsuite"}, "pool_not_found"),
                           ({"snapshot": "authsuite"}, "snapshot_not_found")):
            r = c.post("/v1/sandboxes", headers=_auth(server.bob), json=body)
            assert (r.status_code, r.json()["code"]) == (404, code)
        for what in ("sandboxes", "snapshots", "pools"):
            r = c.get(f"/v1/{what}", headers=_auth(server.bob))
            assert r.status_code == 200 and r.json() == {what: []}
    # nothing bob or the bad keys did reached alice's sandbox
    assert alice_sb.is_running()
    assert shell.info().state == "running" and shell.info().stdin_open
    shell.close_stdin()
    assert shell.wait().exit_code == 0
    assert alice_sb.commands.run("test -e /tmp/pwned", check=False).exit_code == 1
    assert alice_sb.ports.list() == [] and alice_sb.network.policy is None
    assert [p.name for p in Pool.list(api_key=server.alice, url=server.url)] == ["authsuite"]
    alice_pool.delete()
    store = SnapshotStore(api_key=server.alice, url=server.url)
    assert [s.name for s in store.list()] == ["authsuite"]  # bob's DELETE did nothing
    store.remove("authsuite")


# ---------------------------------------------------------------------------- quota, TTL
# test_quota_kill_and_ttl_free_slots runs on the in-memory fake: tests/test_server_fake.py


# ---------------------------------------------------------------------------- restart


def test_restart_keeps_sandboxes_and_owners(server: ServerProc, alice_sb: Sandbox) -> None:
    key: str = server.alice
    alice_sb.files.write("/root/kept", "before restart")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        server.stop(sig)
        server.start()
        sb = Sandbox.connect(alice_sb.sandbox_id, api_key=key, url=server.url)
        assert sb.files.read("/root/kept") == "before restart", sig
        sb.close()
        with pytest.raises(VmNotFound):  # ownership survived too
            Sandbox.connect(alice_sb.sandbox_id, api_key=server.bob,
                            url=server.url)
    assert alice_sb.commands.run("echo old handle").stdout == "old handle\n"
