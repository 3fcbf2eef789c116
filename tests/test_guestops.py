"""Typed guest operations: GuestOps against a scripted guest (the fuzz tests' fake) and
against the real agent's dispatch table; the one-place rule for op requests."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sandvm
from sandvm import wire
from sandvm.agent_client import AgentConnection, HostStream
from sandvm.errors import (
    AgentProtocolError,
    GuestError,
    GuestFileExists,
    GuestFileNotFound,
    InvalidPath,
    InvalidSpec,
    PortRefused,
)
from sandvm.guestops import GuestOps
from sandvm.values import CommandStats, EntryInfo
from test_agent_fuzz import Guest, run, run_case
from test_ports import _FakeAgent, _load_agent

SRC = Path(sandvm.__file__).parent
# modules that may hold dict literals with an "op" key, and why
RAW_OP_ALLOWED = {
    "guestops.py": "the one typed client of the guest: builds every request",
    "guest/agent.py": "the guest side: serves the requests",
    "runtime/journal.py": "journal entries name the runtime operation they record"
                          " (rt.create, ...), not a guest op",
}
ENTRY = {"path": "/etc/hosts", "name": "hosts", "type": "file", "size": 12, "mode": 0o644,
         "mtime": 1.5, "uid": 0, "gid": 0}


# --------------------------------------------------------------------------- the rules


def _op_dicts(tree: ast.AST) -> list[int]:
    """Lines of ``{"op": ...}`` literals and ``dict(op=...)`` calls."""
    return [node.lineno for node in ast.walk(tree)
            if (isinstance(node, ast.Dict)
                and any(isinstance(k, ast.Constant) and k.value == "op" for k in node.keys))
            or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "dict" and any(k.arg == "op" for k in node.keywords))]


def test_no_module_but_guestops_builds_op_requests() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in RAW_OP_ALLOWED:
            continue
        found += [f"{rel}:{line}" for line in _op_dicts(ast.parse(path.read_text()))]
    assert not found, f"raw {{'op': ...}} requests outside guestops.py: {found}"
    for rel in RAW_OP_ALLOWED:  # no stale entries
        assert (SRC / rel).exists(), rel


def test_the_scan_finds_a_raw_request() -> None:
    assert _op_dicts(ast.parse('conn.call({"op": "stat", "path": p})\nx = {"a": 1}')) == [1]
    assert _op_dicts(ast.parse('x = 1\nconn.open(dict(op="tar", path=p))')) == [2]


def test_the_agent_serves_every_op_from_one_table() -> None:
    mod = _load_agent()
    assert set(mod.OPS) == set(wire.Op)
    for op, (kind, handler) in mod.OPS.items():
        assert kind == (mod.STREAM if op in wire.STREAM_OPS else mod.CALL), op
        if kind == mod.STREAM:
            assert issubclass(handler, mod.Stream), op
        else:
            assert callable(handler), op
    assert set(wire.Op) == wire.STREAM_OPS | wire.CALL_OPS
    assert not wire.STREAM_OPS & wire.CALL_OPS


def test_guestops_has_one_method_per_op() -> None:
    names = {"list": "list_dir"}
    for op in wire.Op:
        assert callable(getattr(GuestOps, names.get(op.value, op.value), None)), op


# --------------------------------------------------------------------------- scripted guest


def _reply_guest(reply: bytes | None = None, *, code: str | None = None
                 ) -> Callable[[Guest], Awaitable[dict[str, Any]]]:
    """Answer the first OPEN with ``reply`` (a REPLY's JSON), or a RESET with ``code``;
    return the request it carried."""

    async def guest(g: Guest) -> dict[str, Any]:
        await g.handshake()
        req = await g.expect_open(1)
        if code is not None:
            await g.send(wire.encode_json(wire.RESET, 1, {"code": code, "message": "no"}))
        elif reply is not None:
            await g.send(wire.encode(wire.REPLY, 1, reply))
        await g.host_hangs_up()
        return req

    return guest


def _host(call: Callable[[GuestOps], Awaitable[Any]]
          ) -> Callable[[AgentConnection], Awaitable[Any]]:
    async def host(conn: AgentConnection) -> Any:
        await conn.handshake(timeout=2)
        try:
            return await call(GuestOps(conn))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc

    return host


T = 5.0
CALLS: list[tuple[Callable[[GuestOps], Awaitable[Any]], dict[str, Any], bytes, Any]] = [
    (lambda o: o.stat(path="/etc/hosts", timeout=T), {"op": "stat", "path": "/etc/hosts"},
     wire.encode_json(wire.REPLY, 0, ENTRY)[wire.HEADER_SIZE:],
     EntryInfo(path="/etc/hosts", name="hosts", type="file", size=12, mode=0o644, mtime=1.5)),
    (lambda o: o.exists(path="/x", timeout=T), {"op": "exists", "path": "/x"},
     b'{"exists":true}', True),
    (lambda o: o.exists(path="/x", timeout=T), {"op": "exists", "path": "/x"},
     b'{"exists":"yes"}', False),
    (lambda o: o.make_dir(path="/d", mode=0o700, timeout=T),
     {"op": "make_dir", "path": "/d", "mode": 0o700}, b'{"created":true}', True),
    (lambda o: o.remove(path="/d", recursive=False, timeout=T),
     {"op": "remove", "path": "/d", "recursive": False}, b"{}", None),
    (lambda o: o.rename(path="/a", dst="/b", overwrite=False, timeout=T),
     {"op": "rename", "path": "/a", "dst": "/b", "overwrite": False}, b"{}", None),
    (lambda o: o.chown(path="/s", user="app", mode=0o400, timeout=T),
     {"op": "chown", "path": "/s", "user": "app", "mode": 0o400}, b'{"uid":1,"gid":1}', None),
    (lambda o: o.mount_tmpfs(path="/run/s", mode=0o500, user=None, timeout=T),
     {"op": "mount_tmpfs", "path": "/run/s", "mode": 0o500, "user": None}, b"{}", None),
    (lambda o: o.mount_tmpfs(path="/run/s", mode=0o500, user="app", size=8192, timeout=T),
     {"op": "mount_tmpfs", "path": "/run/s", "mode": 0o500, "user": "app", "size": 8192},
     b"{}", None),
    (lambda o: o.stats(pid=42, timeout=T), {"op": "stats", "pid": 42},
     b'{"running":true,"cpu_usec":7,"memory_bytes":4096,"processes":2}',
     CommandStats(running=True, cpu_usec=7, memory_bytes=4096, processes=2)),
    (lambda o: o.configure(time_ns=5, timeout=T), {"op": "configure", "time_ns": 5},
     b'{"clock":true}', None),
    (lambda o: o.configure(seed="ab", time_ns=5, hostname="h", sandbox_id="sb-1", timeout=T),
     {"op": "configure", "seed": "ab", "time_ns": 5, "hostname": "h", "sandbox_id": "sb-1"},
     b"{}", None),
    (lambda o: o.mount_root(serial="root", timeout=T), {"op": "mount_root", "serial": "root"},
     b'{"root":"/run/sandvm/root"}', None),
    (lambda o: o.mount_volume(serial="vol-0", path="/data", read_only=True, timeout=T),
     {"op": "mount_volume", "serial": "vol-0", "path": "/data", "read_only": True}, b"{}",
     None),
    (lambda o: o.sync(timeout=T), {"op": "sync"}, b"{}", None),
    (lambda o: o.tcp_listening(port=80, host="127.0.0.1", timeout=T),
     {"op": "tcp_listening", "port": 80, "host": "127.0.0.1"}, b'{"listening":false}', False),
    (lambda o: o.egress_listen(port=3128, timeout=T), {"op": "egress_listen", "port": 3128},
     b'{"port":3128}', None),
    (lambda o: o.egress_close(timeout=T), {"op": "egress_close"}, b"{}", None),
]


@pytest.mark.parametrize(("call", "request_", "reply", "expected"), CALLS)
def test_call_sends_its_request_and_reads_its_reply(
        tmp_path: Path, call: Callable[[GuestOps], Awaitable[Any]], request_: dict[str, Any],
        reply: bytes, expected: Any) -> None:
    got, sent = run(run_case(tmp_path, _reply_guest(reply), _host(call)))
    assert sent == request_
    assert got == expected


STREAMS: list[tuple[Callable[[GuestOps], Awaitable[HostStream]], dict[str, Any]]] = [
    (lambda o: o.write_file(path="/f", mode=0o600, make_parents=False),
     {"op": "write_file", "path": "/f", "mode": 0o600, "make_parents": False}),
    (lambda o: o.read_file(path="/f", max_bytes=10),
     {"op": "read_file", "path": "/f", "max_bytes": 10}),
    (lambda o: o.list_dir(path="/", depth=2), {"op": "list", "path": "/", "depth": 2}),
    (lambda o: o.untar(path="/t"), {"op": "untar", "path": "/t"}),
    (lambda o: o.tar(path="/t", max_bytes=5, max_files=6),
     {"op": "tar", "path": "/t", "max_bytes": 5, "max_files": 6}),
    (lambda o: o.exec(argv=["true"], stdin=False), {"op": "exec", "argv": ["true"],
                                                    "stdin": False}),
    (lambda o: o.exec(shell="echo $X", env={"X": "1"}, cwd="/tmp", timeout=2.5, stdin=True,
                      user="app"),
     {"op": "exec", "user": "app", "shell": "echo $X", "env": {"X": "1"}, "cwd": "/tmp",
      "timeout": 2.5, "stdin": True}),
    (lambda o: o.tcp_connect(port=8080, host="::1"),
     {"op": "tcp_connect", "port": 8080, "host": "::1"}),
    (lambda o: o.tcp_connect(port=8080, host="127.0.0.1", notify=False),
     {"op": "tcp_connect", "port": 8080, "host": "127.0.0.1", "notify": False}),
    (lambda o: o.egress_accept(), {"op": "egress_accept"}),
]


@pytest.mark.parametrize(("open_", "request_"), STREAMS)
def test_stream_op_opens_its_stream(tmp_path: Path,
                                    open_: Callable[[GuestOps], Awaitable[HostStream]],
                                    request_: dict[str, Any]) -> None:
    async def call(ops: GuestOps) -> Any:
        st = await open_(ops)
        assert isinstance(st, HostStream)
        item = await st.next(T)
        assert item.kind == "reply"
        return item.message

    got, sent = run(run_case(tmp_path, _reply_guest(b'{"size":0}'), _host(call)))
    assert sent == request_
    assert got == {"size": 0}


def test_every_op_is_covered_here() -> None:
    sent = {r["op"] for _, r, _, _ in CALLS} | {r["op"] for _, r in STREAMS}
    assert sent == set(wire.Op)


@pytest.mark.parametrize("reply", [
    b'{"running":true,"cpu_usec":true,"memory_bytes":1,"processes":1}',
    b'{"running":true,"cpu_usec":1,"memory_bytes":-1,"processes":1}',
    b'{"running":true,"cpu_usec":1,"memory_bytes":1,"processes":1.5}',
    b'{"running":true,"cpu_usec":1,"memory_bytes":1,"processes":' + b"9" * 400 + b"}",
    b'{"running":"yes","cpu_usec":1,"memory_bytes":1,"processes":1}',
    b'{"running":true,"memory_bytes":1,"processes":1}',
])
def test_hostile_stats_are_a_protocol_error(tmp_path: Path, reply: bytes) -> None:
    got, _ = run(run_case(tmp_path, _reply_guest(reply),
                          _host(lambda o: o.stats(pid=1, timeout=T))))
    assert isinstance(got, AgentProtocolError), got


@pytest.mark.parametrize(("call", "reply"), [
    (lambda o: o.stat(path="/", timeout=T), b'{"path":"/","name":"","type":"fifo","size":0,'
                                            b'"mode":0,"mtime":0}'),
    (lambda o: o.stat(path="/", timeout=T), b'{"path":7}'),
    (lambda o: o.tcp_listening(port=1, host="127.0.0.1", timeout=T), b'{"listening":1}'),
    (lambda o: o.tcp_listening(port=1, host="127.0.0.1", timeout=T), b"{}"),
])
def test_hostile_replies_are_protocol_errors(
        tmp_path: Path, call: Callable[[GuestOps], Awaitable[Any]], reply: bytes) -> None:
    got, _ = run(run_case(tmp_path, _reply_guest(reply), _host(call)))
    assert isinstance(got, AgentProtocolError), got


@pytest.mark.parametrize(("code", "cls"), [("file_not_found", GuestFileNotFound),
                                           ("file_exists", GuestFileExists),
                                           ("invalid_path", InvalidPath),
                                           ("connection_refused", PortRefused),
                                           ("something_new", GuestError)])
def test_guest_errors_keep_their_mapping(tmp_path: Path, code: str, cls: type) -> None:
    got, _ = run(run_case(tmp_path, _reply_guest(code=code),
                          _host(lambda o: o.rename(path="/a", dst="/b", overwrite=True,
                                                   timeout=T))))
    assert type(got) is cls


def test_exec_takes_a_shell_string_or_an_argv() -> None:
    async def go() -> None:
        ops = GuestOps(None)  # type: ignore[arg-type]  # refused before it is used
        with pytest.raises(InvalidSpec):
            await ops.exec(stdin=False)
        with pytest.raises(InvalidSpec):
            await ops.exec(shell="true", argv=["true"], stdin=False)

    asyncio.run(go())


# --------------------------------------------------------------------------- the real agent


class AgentRig:
    """The guest agent's dispatch and handlers (in a thread, on the host) ↔ socketpair ↔
    AgentConnection on a private loop thread."""

    def __init__(self) -> None:
        guest_sock, host_sock = socket.socketpair()
        guest_sock.setblocking(False)
        self.guest_sock = guest_sock
        self.agent = _FakeAgent(_load_agent(), guest_sock.fileno())
        self.agent_thread = threading.Thread(target=self._run_agent, daemon=True)
        self.agent_thread.start()
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.loop_thread.start()

        async def setup() -> AgentConnection:
            reader, writer = await asyncio.open_connection(sock=host_sock)
            conn = AgentConnection(reader, writer)
            await conn.handshake(timeout=5)
            return conn

        self.conn = self.run(setup())
        self.ops = GuestOps(self.conn)

    def _run_agent(self) -> None:
        with contextlib.suppress(SystemExit):
            self.agent.loop.run()

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def close(self) -> None:
        self.run(self.conn.close())
        self.agent.stop = True
        self.agent_thread.join(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(5)
        self.guest_sock.close()


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentRig]:
    rig = AgentRig()
    try:
        yield rig
    finally:
        rig.close()


def test_real_agent_file_calls(agent: AgentRig, tmp_path: Path) -> None:
    ops, d = agent.ops, str(tmp_path / "d")
    assert agent.run(ops.exists(path=d, timeout=T)) is False
    assert agent.run(ops.make_dir(path=d, mode=0o750, timeout=T)) is True
    assert agent.run(ops.make_dir(path=d, mode=0o750, timeout=T)) is False
    entry = agent.run(ops.stat(path=d, timeout=T))
    assert (entry.type, entry.name, entry.mode) == ("dir", "d", 0o750)
    (tmp_path / "f").write_text("x")
    with pytest.raises(GuestFileExists):
        agent.run(ops.rename(path=str(tmp_path / "f"), dst=d, overwrite=False, timeout=T))
    agent.run(ops.rename(path=str(tmp_path / "f"), dst=d + "/g", overwrite=False, timeout=T))
    assert agent.run(ops.stat(path=d + "/g", timeout=T)).size == 1
    agent.run(ops.remove(path=d, recursive=True, timeout=T))
    assert not os.path.exists(d)
    with pytest.raises(GuestFileNotFound):
        agent.run(ops.stat(path=d, timeout=T))
    with pytest.raises(InvalidPath):
        agent.run(ops.stat(path="relative", timeout=T))


def test_real_agent_streams_and_probes(agent: AgentRig, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")

    async def read() -> tuple[bytes, dict[str, Any] | None]:
        st = await agent.ops.read_file(path=str(tmp_path / "f"), max_bytes=100)
        data = b""
        while True:
            item = await st.next(T)
            if item.kind == "data":
                data += item.data
            elif item.kind == "reply":
                return data, item.message

    assert agent.run(read()) == (b"hello", {"size": 5})
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert agent.run(agent.ops.tcp_listening(port=port, host="127.0.0.1", timeout=T))


def test_real_agent_refuses_an_unknown_op(agent: AgentRig) -> None:
    with pytest.raises(GuestError) as exc:
        agent.run(agent.conn.call({"op": "format_disk", "path": "/"}, timeout=T))
    assert exc.value.details.get("guest_code") == "unknown_op"
    with pytest.raises(GuestError) as exc:
        agent.run(agent.conn.call({"path": "/"}, timeout=T))
    assert exc.value.details.get("guest_code") == "unknown_op"
