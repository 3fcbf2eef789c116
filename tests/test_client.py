"""The remote SDK against a mock transport, and the server's pure parts (no VM, no QEMU):
error codes both ways, the NDJSON stream, the key store, metrics, sync/async parity."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import sandvm.client
from sandvm import errors
from sandvm.client import AsyncSandbox, Sandbox
from sandvm.client import _async as ca
from sandvm.client import _http as ch
from sandvm.client import _sync as cs
from sandvm.errors import (
    CommandExitError,
    CommandNotFound,
    CommandTimeout,
    InvalidSpec,
    SandboxStateError,
    SandvmError,
    ServerUnreachable,
    ServiceError,
    Unauthenticated,
    VmNotFound,
)

OPENAPI = json.loads((Path(__file__).parents[1] / "docs" / "openapi.json").read_text())
_MockTransport = httpx.MockTransport  # the unchecked one, for responses no server sends


def _operation(method: str, path: str) -> dict[str, Any] | None:
    """The OpenAPI operation serving ``method path`` (path templates matched)."""
    import re

    for template, ops in OPENAPI["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path) and method.lower() in ops:
            return dict(ops[method.lower()])
    return None


def check_against_spec(req: httpx.Request, resp: httpx.Response) -> None:
    """Fail unless ``resp`` is what docs/openapi.json says ``req``'s operation answers:
    a declared status, a declared content type and a body valid against its schema
    (each line of an NDJSON stream against the line schema)."""
    import jsonschema_rs

    what = f"{req.method} {req.url.path} -> {resp.status_code}"
    op = _operation(req.method, req.url.path)
    assert op is not None, f"{req.method} {req.url.path} is not in docs/openapi.json"
    entry = op["responses"].get(str(resp.status_code)) or op["responses"].get("default")
    assert entry is not None, f"{what}: status not declared in docs/openapi.json"
    content = entry.get("content") or {}
    if not content:
        assert not resp.content, f"{what}: a body where the spec declares none"
        return
    ctype = resp.headers.get("content-type", "").split(";")[0].strip()
    assert ctype in content, f"{what}: content type {ctype!r} is not one of {list(content)}"
    schema = content[ctype].get("schema")
    if schema is None or ctype not in ("application/json", "application/x-ndjson"):
        return
    validator = jsonschema_rs.validator_for({**schema, "components": OPENAPI["components"]})
    bodies = ([json.loads(resp.content)] if ctype == "application/json" else
              [json.loads(line) for line in resp.content.splitlines() if line.strip()])
    for body in bodies:
        errors_ = [e.message for e in validator.iter_errors(body)]
        assert not errors_, f"{what}: {body!r} does not match the spec: {errors_[:3]}"


class _SpecTransport(_MockTransport):
    """A mock server whose every answer is checked against docs/openapi.json."""

    def __init__(self, handler: Callable[[httpx.Request], Any]) -> None:
        def checked(req: httpx.Request) -> Any:
            resp = handler(req)
            if isinstance(resp, httpx.Response):
                check_against_spec(req, resp)
            return resp

        super().__init__(checked)


@pytest.fixture(autouse=True)
def _mocks_follow_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpx, "MockTransport", _SpecTransport)


INFO = {"sandbox_id": "sb-0123456789", "state": "running", "image": "base",
        "memory_mib": 256, "vcpus": 1, "created": 1.0, "expires_at": 301.0,
        "network": False}
Handler = Callable[[httpx.Request], httpx.Response]
NDJSON = {"Content-Type": "application/x-ndjson"}


def _lines(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def test_mock_answers_are_checked_against_the_spec() -> None:
    """What the mocks here answer is what docs/openapi.json says the server answers."""
    get = httpx.Request("GET", "http://sv/v1/sandboxes/sb-0123456789")
    check_against_spec(get, httpx.Response(200, json=INFO))
    with pytest.raises(AssertionError, match="does not match the spec"):
        check_against_spec(get, httpx.Response(200, json={**INFO, "memory_mib": "lots"}))
    with pytest.raises(AssertionError, match="status not declared"):
        check_against_spec(httpx.Request("DELETE", get.url), httpx.Response(200, json=INFO))
    with pytest.raises(AssertionError, match="content type"):
        check_against_spec(get, httpx.Response(200, content=b"{}"))
    with pytest.raises(AssertionError, match=r"not in docs/openapi\.json"):
        check_against_spec(httpx.Request("GET", "http://sv/v1/nope"), httpx.Response(200))
    run = httpx.Request("POST", "http://sv/v1/sandboxes/sb-0123456789/commands")
    with pytest.raises(AssertionError, match="does not match the spec"):
        check_against_spec(run, httpx.Response(200, headers=NDJSON, content=_lines(
            {"type": "stdout", "text": "x"}, {"type": "exit", "exit_code": "0"})))


def _server(commands: bytes | None = None, *, status: int = 200,
            seen: list[httpx.Request] | None = None, spec: bool = True) -> httpx.MockTransport:
    """A fake server: creates and gets INFO, answers commands with ``commands``; with
    ``spec=False`` its answers are not checked against docs/openapi.json (for what a
    broken server or a proxy in front of it may send)."""
    def handle(req: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(req)
        if req.url.path == "/v1/sandboxes" and req.method == "POST":
            return httpx.Response(201, json=INFO)
        if req.url.path.endswith("/commands"):
            return httpx.Response(status, content=commands or b"",
                                  headers=NDJSON if status == 200 else
                                  {"Content-Type": "application/json"})
        if req.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json=INFO)

    return httpx.MockTransport(handle) if spec else _MockTransport(handle)


async def _sandbox(transport: httpx.MockTransport) -> AsyncSandbox:
    return await AsyncSandbox.create(api_key="sandvm_k", url="http://sv", transport=transport)


# ---------------------------------------------------------------------------- errors


def _all_error_classes() -> list[type[SandvmError]]:
    return errors._all_subclasses(SandvmError)


def test_every_code_comes_back_as_its_class() -> None:
    for cls in _all_error_classes():
        exc = errors.error_from_dict({"code": cls.code, "message": "what to change"})
        assert type(exc) is cls and exc.message == "what to change", cls
        assert str(exc) == "what to change"
    assert isinstance(errors.error_from_dict({"code": "vm_not_found", "message": "x"}),
                      VmNotFound)
    assert errors.error_from_dict({"code": "vm_not_found", "message": "x"}).vm_id is None  # type: ignore[attr-defined]
    for junk in (None, [], {"code": 3}, {"message": "m"}, {"code": "from-the-future"}):
        assert type(errors.error_from_dict(junk)) is SandvmError


def test_codes_are_unique() -> None:
    codes = [c.code for c in _all_error_classes()]
    assert len(codes) == len(set(codes))


def test_http_status_of_errors() -> None:
    from sandvm.server.app import status_for

    expected = {errors.Unauthenticated: 401, errors.QuotaExceeded: 429,
                errors.RequestTooLarge: 413, errors.FileTooLarge: 413,
                errors.SandboxStateError: 409, errors.SandboxBusy: 409,
                errors.InvalidSpec: 400, errors.UnknownImage: 400, errors.InvalidPath: 400,
                errors.GuestFileNotFound: 404, errors.GuestPermissionDenied: 403,
                errors.AgentTimeout: 504, errors.AssetMissing: 503, errors.VmBootError: 500,
                errors.AgentDisconnected: 500, errors.ServerUnreachable: 500}
    for cls, status in expected.items():
        assert status_for(cls.__new__(cls)) == status, cls
    assert status_for(VmNotFound("sb-x")) == 404
    from sandvm.server.commands import unknown_command

    assert status_for(unknown_command("cmd-x", "sb-x")) == 404


# ---------------------------------------------------------------------------- the client


def test_settings_come_from_arguments_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDVM_API_KEY", raising=False)
    monkeypatch.delenv("SANDVM_URL", raising=False)
    with pytest.raises(Unauthenticated, match="SANDVM_API_KEY"):
        ch._settings(None, None)
    assert ch._settings("k", None) == ("k", ca.DEFAULT_URL)
    monkeypatch.setenv("SANDVM_API_KEY", "envkey")
    monkeypatch.setenv("SANDVM_URL", "https://sandvm.example:8443/")
    assert ch._settings(None, None) == ("envkey", "https://sandvm.example:8443")
    assert ch._settings("k", "http://h:1") == ("k", "http://h:1")
    with pytest.raises(InvalidSpec):
        ch._settings("k", "ftp://h")


def test_run_streams_decodes_and_checks() -> None:
    euro = "€".encode()  # split across two chunks: text, then bytes that are not UTF-8
    stream = _lines({"type": "stdout", "text": "a\n"},
                    {"type": "stdout", "b64": base64.b64encode(euro[:1]).decode()},
                    {"type": "stdout", "b64": base64.b64encode(euro[1:] + b"\xff").decode()},
                    {"type": "stderr", "text": "e"},
                    {"type": "exit", "exit_code": 3, "signal": None, "timed_out": False,
                     "duration": 0.5})
    seen: list[httpx.Request] = []

    async def go() -> None:
        sb = await _sandbox(_server(stream, seen=seen))
        got: list[str] = []

        async def on_err(s: str) -> None:  # coroutine callbacks are awaited
            got.append("err:" + s)

        with pytest.raises(CommandExitError) as ei:
            await sb.commands.run("x", on_stdout=got.append, on_stderr=on_err,
                                  stdin=b"\x00\x01", env={"A": "1"}, timeout=None)
        r = ei.value.result
        assert (r.exit_code, r.stdout_bytes, r.stderr, r.duration) == (
            3, b"a\n" + euro + b"\xff", "e", 0.5)
        assert got == ["a\n", "€\ufffd", "err:e"]
        body = json.loads(seen[-1].content)
        assert body == {"cmd": "x", "timeout": None, "env": {"A": "1"},
                        "stdin_b64": base64.b64encode(b"\x00\x01").decode()}
        assert seen[-1].headers["authorization"] == "Bearer sandvm_k"
        r = await sb.commands.run(["x"], check=False, stdin="text")
        assert r.exit_code == 3 and json.loads(seen[-1].content)["stdin"] == "text"
        await sb.kill()

    asyncio.run(go())


@pytest.mark.parametrize(("events", "exc"), [
    ([{"type": "exit", "exit_code": 137, "signal": None, "timed_out": True}], CommandTimeout),
    ([{"type": "stdout", "text": "x"}, {"type": "error", "code": "command_not_found",
                                         "message": "no such command: x"}], CommandNotFound),
    ([{"type": "stdout", "text": "x"}], ServerUnreachable),  # stream ends without an exit
    ([{"type": "exit", "exit_code": "0"}], ServiceError),
    ([{"type": "stdout", "b64": "!!"}], ServiceError),
])
def test_run_failures(events: list[dict[str, Any]], exc: type[Exception]) -> None:
    async def go() -> None:
        # the ServiceError cases are what a broken server sends: off the spec
        sb = await _sandbox(_server(_lines(*events), spec=exc is not ServiceError))
        with pytest.raises(exc):
            await sb.commands.run("x", check=False)

    asyncio.run(go())


def test_non_json_lines_and_error_statuses() -> None:
    async def go() -> None:
        sb = await _sandbox(_server(b"<html>\n", spec=False))
        with pytest.raises(ServiceError, match="not JSON"):
            await sb.commands.run("x")
        sb = await _sandbox(_server(b"<html>bad gateway</html>", status=502, spec=False))
        with pytest.raises(ServiceError, match="HTTP 502"):
            await sb.commands.run("x")
        body = json.dumps({"code": "unauthenticated", "message": "revoked"}).encode()
        sb = await _sandbox(_server(body, status=401))
        with pytest.raises(Unauthenticated, match="revoked"):
            await sb.commands.run("x")

    asyncio.run(go())


def test_unreachable_server_and_killed_sandbox() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ServerUnreachable) as ei:
        Sandbox.create(api_key="sandvm_k", url=f"http://127.0.0.1:{port}")
    assert isinstance(ei.value.__cause__, httpx.ConnectError)
    sb = Sandbox.create(api_key="sandvm_k", url="http://sv", transport=_server())
    assert sb.sandbox_id == INFO["sandbox_id"] and sb.get_info().expires_at == 301.0
    sb.kill()
    sb.kill()  # idempotent
    with pytest.raises(SandboxStateError):
        sb.commands.run("true")
    with pytest.raises(SandboxStateError):
        sb.files.read("/x")
    assert not sb.is_running()


def test_files_over_the_mock() -> None:
    store: dict[str, bytes] = {}

    def handle(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/files"):
            path = req.url.params["path"]
            if req.method == "PUT":
                store[path] = req.content
                return httpx.Response(200, json={"path": path, "size": len(req.content)})
            if path not in store:
                return httpx.Response(404, json={"code": "file_not_found", "message": path})
            return httpx.Response(200, content=store[path],
                                  headers={"Content-Type": "application/octet-stream"})
        if req.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json=INFO)

    with Sandbox.connect("sb-0123456789", api_key="k", url="http://sv",
                         transport=httpx.MockTransport(handle)) as sb:
        assert sb.files.write("/a", "héllo").size == 6
        assert sb.files.read("/a") == "héllo"
        assert b"".join(sb.files.read_stream("/a")) == "héllo".encode()
        with pytest.raises(errors.FileTooLarge):
            sb.files.read("/a", max_bytes=2)
        with pytest.raises(errors.GuestFileNotFound):
            sb.files.read("/missing")


# ---------------------------------------------------------------------------- surface


def _public(cls: type) -> dict[str, Any]:
    # own and inherited (a sync twin may share a base class), nearest definition wins
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__[:-1]):
        merged.update(vars(klass))
    return {n: m for n, m in merged.items()
            if not n.startswith("_") and (callable(m) or isinstance(m, (property, classmethod)))}


def test_sync_and_async_client_surfaces_match() -> None:
    for acls, scls in ((ca.AsyncSandbox, cs.Sandbox), (ca.AsyncCommands, cs.Commands),
                       (ca.AsyncFiles, cs.Files), (ca.AsyncCommandHandle, cs.CommandHandle)):
        a = {n for n in _public(acls) if n != "aclose"}
        assert a == set(_public(scls)), (acls, a ^ set(_public(scls)))
        for name in a:
            if isinstance(_public(acls)[name], property):
                assert isinstance(_public(scls)[name], property), name
                continue
            asig = inspect.signature(getattr(acls, name))
            ssig = inspect.signature(getattr(scls, name))
            assert list(asig.parameters) == list(ssig.parameters), name
            for p in asig.parameters.values():
                q = ssig.parameters[p.name]
                assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)


def test_client_names_and_defaults_are_the_local_ones() -> None:
    from sandvm import sandbox as local

    for remote, here, skip in ((ca.AsyncCommands.run, local.AsyncCommands.run, set()),
                               (ca.AsyncFiles.write, local.AsyncFiles.write, set()),
                               (ca.AsyncFiles.read, local.AsyncFiles.read, set()),
                               (ca.AsyncSandbox.create, local.AsyncSandbox.create,
                                {"api_key", "url", "transport"})):
        rp, lp = inspect.signature(remote).parameters, inspect.signature(here).parameters
        for name, p in rp.items():
            if name in skip:
                continue
            assert name in lp, (remote, name)
            assert p.default == lp[name].default and p.kind == lp[name].kind, (remote, name)
    for name in sandvm.client.__all__:
        assert hasattr(sandvm.client, name)
    assert sorted(sandvm.client.__all__) == sandvm.client.__all__


# ---------------------------------------------------------------------------- server parts


def test_key_store(tmp_path: Path) -> None:
    from sandvm.server import ServerStore

    st = ServerStore(tmp_path / "state")
    key = st.create_key("ci", tenant="acme")
    assert key.startswith("sandvm_") and len(key) > 40
    assert st.tenant_for_key(key) == "acme"
    assert [(k.name, k.tenant) for k in st.keys()]  # noqa: SIM118 == [("ci", "acme")]
    for bad in ("", "sandvm_x", key + "x", key[:-1], "x" * 10_000):
        with pytest.raises(Unauthenticated):
            st.tenant_for_key(bad)
    with pytest.raises(InvalidSpec):
        st.create_key("ci")
    with pytest.raises(InvalidSpec):
        st.create_key("a b")
    assert st.create_key("bob") != key
    st.revoke_key("ci")
    with pytest.raises(Unauthenticated):
        st.tenant_for_key(key)
    with pytest.raises(InvalidSpec):
        st.revoke_key("ci")
    assert os.stat(st.path).st_mode & 0o777 == 0o600
    assert key.encode() not in st.path.read_bytes()
    assert st.reserve("sb-1", "acme", limit=2) and st.reserve("sb-2", "acme", limit=2)
    assert not st.reserve("sb-3", "acme", limit=2)
    assert st.reserve("sb-4", "other", limit=2)
    st.mark_ended("sb-1")
    assert st.reserve("sb-3", "acme", limit=2)
    assert st.owned("acme") == ["sb-2", "sb-3"] and st.owner("sb-1") is not None
    assert st.count_live() == 3


def test_config_refuses_nonsense(tmp_path: Path) -> None:
    from sandvm.server import ServerConfig

    for bad in ({"max_sandboxes": 0}, {"max_json_bytes": True}, {"default_ttl": -1},
                {"default_ttl": 100, "max_ttl": 10}):
        with pytest.raises(errors.ConfigError):
            ServerConfig(state_dir=tmp_path, **bad)  # type: ignore[arg-type]


def test_metrics_text_format() -> None:
    from sandvm.server.metrics import Metrics

    m = Metrics(live_sandboxes=lambda: 2)
    m.requests.inc(method="GET", route="/v1/sandboxes", status="200")
    m.requests.inc(method="GET", route="/v1/sandboxes", status="200")
    m.command_seconds.observe(0.02)
    text = m.render()
    assert 'sandvm_http_requests_total{method="GET",route="/v1/sandboxes",status="200"} 2' \
        in text
    assert 'sandvm_command_duration_seconds_bucket{le="0.025"} 1' in text
    assert 'sandvm_command_duration_seconds_bucket{le="+Inf"} 1' in text
    assert "sandvm_command_duration_seconds_count 1" in text
    assert "sandvm_sandboxes_live 2" in text
    assert "# TYPE sandvm_sandboxes_live gauge" in text


def test_remote_command_handle_mirrors_the_local_one() -> None:
    from sandvm import sandbox as local

    for rcls, lcls in ((ca.AsyncCommandHandle, local.AsyncCommandHandle),
                       (cs.CommandHandle, local.CommandHandle)):
        lpub, rpub = _public(lcls), _public(rcls)
        assert set(lpub) <= set(rpub), set(lpub) - set(rpub)
        assert set(rpub) - set(lpub) == {"info"}  # and the command_id attribute
        for name, m in lpub.items():
            if isinstance(m, property):
                assert isinstance(rpub[name], property), name
                continue
            lsig, rsig = inspect.signature(m), inspect.signature(rpub[name])
            assert [(p.name, p.kind, p.default) for p in lsig.parameters.values()] == \
                [(p.name, p.kind, p.default) for p in rsig.parameters.values()], name


# ---------------------------------------------------------------------------- background


def test_background_handle_reconnects_from_the_next_seq() -> None:
    """The output stream breaks twice (it ends early, then the connection drops); the
    handle asks again from the next seq and misses nothing."""
    calls: list[int] = []
    events = [{"seq": 0, "type": "stdout", "text": "a"},
              {"seq": 1, "type": "stderr", "text": "b"},
              {"seq": 2, "type": "stdout", "text": "c"},
              {"seq": 3, "type": "exit", "exit_code": 0, "signal": None, "timed_out": False,
               "duration": 1.0}]
    cinfo = {"command_id": "cmd-0123456789", "sandbox_id": INFO["sandbox_id"], "cmd": "x",
             "state": "running", "pid": 42, "started": 1.0, "ended": None,
             "exit_code": None, "signal": None, "timed_out": None, "error_code": None,
             "error_message": None, "stdin_open": True, "first_seq": 0, "next_seq": 0,
             "output_dropped": False}
    seen: list[httpx.Request] = []

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        path = req.url.path
        if path.endswith("/commands/start"):
            return httpx.Response(201, json=cinfo)
        if path.endswith("/output"):
            offset = int(req.url.params["offset"])
            calls.append(offset)
            if len(calls) == 1:  # ends early
                return httpx.Response(200, content=_lines(*events[:2]), headers=NDJSON)
            if len(calls) == 2:
                raise httpx.ReadError("connection reset")
            return httpx.Response(200, content=_lines(*events[offset:]), headers=NDJSON)
        if path.endswith(("/stdin", "/stdin/close", "/signal")) or req.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json=INFO)

    async def go() -> None:
        sb = await AsyncSandbox.connect("sb-0123456789", api_key="k", url="http://sv",
                                        transport=httpx.MockTransport(handle))
        h = await sb.commands.run("x", background=True, check=False)
        assert h.command_id == "cmd-0123456789" and h.pid == 42
        await h.send_stdin(b"\x00in")
        await h.send_signal("int", grace=2)
        r = await h.wait()
        assert (r.stdout, r.stderr, r.exit_code, r.output_truncated) == ("ac", "b", 0, False)
        assert calls == [0, 2, 2]
        sig = [json.loads(q.content) for q in seen if q.url.path.endswith("/signal")]
        assert sig == [{"signal": 2, "grace": 2.0}]
        assert [q.content for q in seen if q.url.path.endswith("/stdin")] == [b"\x00in"]
        await sb.close()

    asyncio.run(go())


def test_background_buffer_drops_the_oldest_and_followers_see_the_jump() -> None:
    from sandvm.server.commands import BackgroundCommand

    async def go() -> None:
        bg = BackgroundCommand(command_id="cmd-1", sandbox_id="sb-1", tenant="t",
                               cmd=["echo", "x"], max_buffer=10)
        follower = bg.follow(0)
        for i in range(5):
            bg.append({"type": "stdout", "text": f"{i}" * 4}, 4)
        first = await follower.__anext__()
        assert first["seq"] == 3  # 0 to 2 were dropped: 10 bytes hold two 4-byte chunks
        assert bg.info().first_seq == 3 and bg.info().output_dropped
        bg.append({"type": "exit", "exit_code": 0}, 0)
        rest = [e async for e in follower]
        assert [e["seq"] for e in rest] == [4, 5] and rest[-1]["type"] == "exit"
        assert [e["seq"] async for e in bg.follow(100)] == [5]  # past the end: the exit
        bg.append({"type": "stdout", "text": "late"}, 4)  # after the exit: ignored
        assert bg.info().state == "exited" and bg.info().next_seq == 6
        waiting = BackgroundCommand(command_id="cmd-2", sandbox_id="sb-1", tenant="t",
                                    cmd="sleep", max_buffer=10)
        assert [e async for e in waiting.follow(0, follow=False)] == []
        task = asyncio.ensure_future(waiting.follow(0).__anext__())
        await asyncio.sleep(0.01)
        assert not task.done()  # following waits for output
        waiting.append({"type": "stderr", "text": "e"}, 1)
        assert (await task)["text"] == "e"

    asyncio.run(go())


def test_openapi_bounds_are_json_schema_keywords() -> None:
    """Found by schemathesis: bounds inside lists and unions came out as pydantic's
    ``ge``/``le``, which JSON Schema tools ignore (so ports [0] looked valid)."""
    doc = json.loads((Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
                      ).read_text())
    bad: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            bad.extend(f"{where}.{k}" for k in ("ge", "le", "gt", "lt") if k in node)
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(doc, "$")
    assert not bad, bad
    ports = doc["components"]["schemas"]["NetworkPolicyBody"]["properties"]["ports"]
    assert ports["items"] == {"maximum": 65535, "minimum": 1, "type": "integer"}


def test_remote_ports_and_network_mirror_sync_async_and_local() -> None:
    from sandvm import network as local_net
    from sandvm import ports as local_ports
    from sandvm.client import _net

    for acls, scls, extra in ((_net.AsyncPorts, _net.Ports, set()),
                              (_net.AsyncNetwork, _net.Network, {"policy"})):
        a, s = set(_public(acls)), set(_public(scls))
        assert a | extra == s, (acls, a ^ s)  # sync's ``policy``: a property that fetches
        for name in a:
            asig = inspect.signature(getattr(acls, name))
            ssig = inspect.signature(getattr(scls, name))
            assert [(p.name, p.kind, p.default) for p in asig.parameters.values()] == \
                [(p.name, p.kind, p.default) for p in ssig.parameters.values()], name
            assert inspect.iscoroutinefunction(getattr(acls, name)), name
    # the names and defaults the local namespaces have (remote: a subset; no connect)
    for remote, local in ((_net.AsyncPorts, local_ports.AsyncPorts),
                          (_net.AsyncNetwork, local_net.AsyncNetwork)):
        for name in ("expose", "wait", "list", "close", "set_policy", "events"):
            if not hasattr(remote, name):
                continue
            lp = inspect.signature(getattr(local, name)).parameters
            for p in inspect.signature(getattr(remote, name)).parameters.values():
                if p.name == "limit":  # remote only: the server keeps the last 1000
                    continue
                assert p.name in lp and lp[p.name].default == p.default, (remote, name, p)
    assert not hasattr(_net.AsyncPorts, "connect")
    src = inspect.getsource(cs.Sandbox.__init__)  # the sync Sandbox has both namespaces
    assert "self.ports = Ports(" in src and "self.network = Network(" in src


def test_remote_ports_and_network_over_the_mock() -> None:
    seen: list[httpx.Request] = []
    port = {"port": 8000, "url": "http://127.0.0.1:4321", "host": "127.0.0.1",
            "host_port": 4321}

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        path = req.url.path
        if path == "/v1/sandboxes" and req.method == "POST":
            return httpx.Response(201, json=INFO)
        if path.endswith("/ports") and req.method == "POST":
            return httpx.Response(201, json=port)
        if path.endswith("/ports"):
            return httpx.Response(200, json={"ports": [port]})
        if path.endswith("/ports/8000"):
            return httpx.Response(200, json={"closed": 1})
        if path.endswith("/wait"):
            body = json.loads(req.content)
            if body["timeout"] >= 60:  # the server's cap: the client waits in steps
                return httpx.Response(504, json={"code": "port_timeout", "message": "no"})
            return httpx.Response(204)
        if path.endswith("/network/events"):
            return httpx.Response(200, json={"events": [{
                "ts": 1.0, "action": "deny", "method": "CONNECT", "host": "x.test",
                "port": 443, "reason": "not allowed", "address": None, "bytes_out": 0,
                "bytes_in": 0, "seconds": 0.0}]})
        if path.endswith("/network"):
            pol = json.loads(req.content) if req.method == "PUT" else None
            return httpx.Response(200, json={"enabled": pol is not None, "policy": pol,
                                             "bytes_total": 0, "connections": 0})
        if req.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json=INFO)

    sb = Sandbox.create(api_key="sandvm_k", url="http://sv",
                        transport=httpx.MockTransport(handle))
    url = sb.ports.expose(8000)
    assert url == "http://127.0.0.1:4321" and (url.port, url.guest_port) == (4321, 8000)
    assert sb.ports.list() == [url] and sb.ports.close(url) == 1
    assert seen[-1].method == "DELETE" and seen[-1].url.path.endswith("/ports/8000")
    sb.ports.wait(8000, timeout=130)  # 60 s (timed out), 60 s (timed out)... then 10 s
    waits = [json.loads(r.content)["timeout"] for r in seen if r.url.path.endswith("/wait")]
    assert waits == [60.0, 60.0, 10.0]
    from sandvm import NetworkPolicy

    assert sb.network.policy is None
    sb.network.set_policy(NetworkPolicy(allow=["pypi.org"], max_bytes=10))
    assert json.loads(seen[-1].content) == {"allow": ["pypi.org"], "ports": [443],
                                            "allow_http": False, "max_bytes": 10}
    with pytest.raises(InvalidSpec):
        sb.network.set_policy(NetworkPolicy(allow=["x"], hosts={"x": "10.0.0.1"}))
    (ev,) = sb.network.events()
    assert (ev.action, ev.host, ev.sandbox_id) == ("deny", "x.test", INFO["sandbox_id"])
    with pytest.raises(InvalidSpec):
        sb.network.events(limit=0)
    sb.kill()


def test_exposed_port_urls_name_a_reachable_host() -> None:
    from sandvm.server.networking import url_host

    assert url_host("127.0.0.1", "whatever:7070") == "127.0.0.1"  # a fixed address
    assert url_host("::1", None) == "::1"
    # a wildcard listener is reached the way the client reached the server
    assert url_host("0.0.0.0", "sandbox.example.com:7070") == "sandbox.example.com"
    assert url_host("0.0.0.0", "10.1.2.3") == "10.1.2.3"
    assert url_host("::", "[fd00::5]:7070") == "fd00::5"
    for junk in (None, "", "a b", "x/y:1", "[::1", "@evil"):
        assert url_host("0.0.0.0", junk) == "127.0.0.1", junk
