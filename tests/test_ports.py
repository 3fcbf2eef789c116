"""Port exposure (issue 6, part 1): host listeners and streams tunneled to guest ports.

Three layers of tests:
- pure: ``-p`` parsing, argument checks, ExposedPort, the sync/async surfaces;
- host-only: the real guest agent's tunnel code (``TcpStream``) run in a thread on
  this machine behind a socketpair, with the real host side (AgentConnection +
  AsyncPorts) and real TCP servers on loopback: fast, and precise about EOF and RST;
- ``qemu``: the same through a real microVM (the shared ``sandbox`` fixture runs each
  test on a cold-booted and on a restored VM), plus one `sandvm run -p` end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import inspect
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import sandvm
from sandvm import _portal, wire
from sandvm.agent_client import AgentConnection
from sandvm.errors import (
    GuestError,
    InvalidSpec,
    PortError,
    PortRefused,
    PortReset,
    PortTimeout,
    SandboxStateError,
    SandvmError,
)
from sandvm.ports import (
    AsyncPorts,
    ExposedPort,
    PortMapping,
    Ports,
    check_bind_host,
    check_guest_host,
    parse_publish,
)

# --------------------------------------------------------------------------- servers

#: A small TCP server, run in the guest (and on the host for the host-only tests):
#: ``python3 srv.py MODE PORT`` (PORT 0: any), prints "ready PORT" once listening.
SERVER = r'''
import hashlib, os, socket, struct, sys, threading

mode, port = sys.argv[1], int(sys.argv[2])
log = sys.argv[3] if len(sys.argv) > 3 else "/tmp/srv-" + sys.argv[2]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(128)


def note(text):
    with open(log, "a") as f:
        f.write(text + "\n")


def drain(c):
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 17)
        if not b:
            return h.hexdigest(), n
        h.update(b)
        n += len(b)


def handle(c):
    try:
        if mode == "echo":  # echoes; half-closes only after the client did
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
        elif mode == "sink":  # "<bytes> <sha256>" of everything received, after EOF
            digest, n = drain(c)
            c.sendall(f"{n} {digest}".encode())
        elif mode == "source":  # "<n>\n" in; sha256 hex + n random bytes out
            line = b""
            while not line.endswith(b"\n"):
                line += c.recv(64)
            data = os.urandom(int(line))
            c.sendall(hashlib.sha256(data).hexdigest().encode() + data)
        elif mode == "first":  # speaks first and half-closes, then counts what comes
            c.sendall(b"hello")
            c.shutdown(socket.SHUT_WR)
            note(f"got {drain(c)[1]}")
        elif mode == "rst":  # resets the connection once it read a byte
            c.recv(1)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "watch":  # notes how the client's side ended
            try:
                drain(c)
                note("eof")
            except ConnectionResetError:
                note("reset")
    except OSError as exc:
        note(f"error {exc!r}")
    finally:
        c.close()


print("ready", srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
'''


def _recv_all(s: socket.socket) -> bytes:
    parts = []
    while True:
        b = s.recv(1 << 17)
        if not b:
            return b"".join(parts)
        parts.append(b)


def _echo_concurrently(port: int, payloads: list[bytes]) -> list[bool]:
    """Send each payload on its own connection at once (then EOF: the echo server
    ends only after it); whether each came back whole."""
    out: dict[int, bytes] = {}

    def client(i: int) -> None:
        with _connect(port) as s:
            s.sendall(payloads[i])
            s.shutdown(socket.SHUT_WR)
            out[i] = _recv_all(s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [out.get(i) == p for i, p in enumerate(payloads)]


def _connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((host, port), timeout=30)
    s.settimeout(30)
    return s


def _rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _poll(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(("spec", "want"), [
    ("8000", PortMapping(8000)),
    ("8080:8000", PortMapping(8000, 8080)),
    ("0:8000", PortMapping(8000, 0)),
    ("0.0.0.0:8080:8000", PortMapping(8000, 8080, "0.0.0.0")),
    ("127.0.0.1::8000", PortMapping(8000, 0, "127.0.0.1")),
    ("127.0.0.1:8000", PortMapping(8000, 0, "127.0.0.1")),
    ("[::1]:8080:8000", PortMapping(8000, 8080, "::1")),
    ("[::]::8000", PortMapping(8000, 0, "::")),
    ("localhost:9000:80/tcp", PortMapping(80, 9000, "127.0.0.1")),
    (" 8000 ", PortMapping(8000)),
])
def test_parse_publish(spec: str, want: PortMapping) -> None:
    assert parse_publish(spec) == want


@pytest.mark.parametrize("spec", [
    "", "x", "0", "8000/udp", "65536", "8080:0", "70000:80", "a:b:c", "1:2:3:4",
    "example.com:80:80", "[::1]8000", "[::1]:1:2:3", "-1", "8080:", ":8000:", "1e3",
])
def test_parse_publish_refuses(spec: str) -> None:
    with pytest.raises(InvalidSpec):
        parse_publish(spec)


def test_host_checks() -> None:
    assert check_bind_host("localhost") == "127.0.0.1"
    assert check_bind_host("0.0.0.0") == "0.0.0.0"
    assert check_bind_host("::") == "::"
    for bad in ("example.com", "", None, 80, "127.1"):
        with pytest.raises(InvalidSpec):
            check_bind_host(bad)
    assert check_guest_host("localhost") == "127.0.0.1"
    assert check_guest_host("127.0.0.2") == "127.0.0.2"
    assert check_guest_host("::1") == "::1"
    for bad in ("10.0.0.1", "0.0.0.0", "::", "169.254.169.254", "example.com", 1):
        with pytest.raises(InvalidSpec):
            check_guest_host(bad)


def test_exposed_port_is_its_url() -> None:
    a = ExposedPort("127.0.0.1", 41234, 8000)
    assert a == "http://127.0.0.1:41234" == a.url == str(a) == f"{a}"
    assert type(a.url) is str and type(str(a)) is str
    assert (a.host, a.port, a.guest_port) == ("127.0.0.1", 41234, 8000)
    assert ExposedPort("::1", 8080, 80) == "http://[::1]:8080"
    assert "guest_port=8000" in repr(a)
    with pytest.raises(AttributeError):
        a.port = 1  # type: ignore[misc]
    b = pickle.loads(pickle.dumps(a))
    assert (b, b.port, b.guest_port) == (a, a.port, a.guest_port)


def test_errors_are_socket_errors_too() -> None:
    assert issubclass(PortRefused, ConnectionRefusedError)
    assert issubclass(PortReset, ConnectionResetError)
    assert issubclass(PortTimeout, TimeoutError)
    for cls in (PortRefused, PortReset, PortTimeout):
        assert issubclass(cls, PortError) and issubclass(cls, SandvmError)
        e = cls("why", guest_code="x")
        assert (str(e), e.message, sandvm.errors.error_class_for_code(cls.code)) == \
            ("why", "why", cls)


def test_sync_and_async_port_surfaces_match() -> None:
    def public(cls: type) -> dict[str, Any]:
        return {n: m for n, m in vars(cls).items() if not n.startswith("_") and callable(m)}

    a, s = public(AsyncPorts), public(Ports)
    assert set(a) == set(s) == {"expose", "wait", "connect", "list", "close"}
    for name in a:
        assert inspect.iscoroutinefunction(a[name]), name
        asig, ssig = inspect.signature(a[name]), inspect.signature(s[name])
        assert list(asig.parameters) == list(ssig.parameters), name
        for p in asig.parameters:
            assert asig.parameters[p].kind == ssig.parameters[p].kind, (name, p)
            assert asig.parameters[p].default == ssig.parameters[p].default, (name, p)
            if p not in ("self", "port"):
                assert asig.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY, (name, p)


# --------------------------------------------------------------------------- host-only


def _load_agent() -> ModuleType:
    """The guest agent as a module (in the guest, wire.py sits beside it)."""
    sys.modules.setdefault("wire", wire)
    path = Path(sandvm.__file__).parent / "guest" / "agent.py"
    spec = importlib.util.spec_from_file_location("sandvm_guest_agent_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FakeAgent:
    """The agent's frame dispatch and streams, without its process-wide set-up
    (cgroups, signals): enough to run the TCP tunnel code on the host."""

    def __init__(self, mod: ModuleType, fd: int) -> None:
        self.mod = mod
        self.loop = mod.Loop()
        self.streams: dict[int, Any] = {}
        self.procs: dict[int, Any] = {}
        self.session: str | None = None
        self.root = None
        self.stop = False
        self.transport = mod.Transport(self.loop, fd, self.on_frame)
        self.loop.call_later(0.05, self._check_stop)

    def _check_stop(self) -> None:
        if self.stop:
            raise SystemExit
        self.loop.call_later(0.05, self._check_stop)

    def on_frame(self, ftype: int, sid: int, payload: bytes) -> None:
        self.mod.Agent.on_frame(self, ftype, sid, payload)

    def _dispatch(self, ftype: int, sid: int, payload: bytes) -> None:
        self.mod.Agent._dispatch(self, ftype, sid, payload)

    def open_stream(self, sid: int, req: dict[str, Any]) -> None:
        self.mod.Agent.open_stream(self, sid, req)

    def send_reset(self, sid: int, exc: BaseException) -> None:
        self.mod.Agent.send_reset(self, sid, exc)

    def detach_all(self) -> None:
        self.mod.Agent.detach_all(self)

    def send_hello(self) -> None:
        self.transport.send(wire.encode_json(wire.HELLO, 0, wire.hello_payload(
            "agent", agent_version="test", boot_id="b", kernel="k", instance="i")))

    def in_root(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class _FakeSandbox:
    op_timeout = 10.0
    sandbox_id = "sb-rig"

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn
        self.closed = False

    def connection(self) -> AgentConnection:
        if self.closed:
            raise SandboxStateError("killed")
        return self.conn


class Rig:
    """A guest agent (in a thread) ↔ socketpair ↔ AgentConnection + AsyncPorts on a
    private event loop thread. ``run(coro)`` runs on that loop."""

    def __init__(self) -> None:
        mod = _load_agent()
        guest_sock, host_sock = socket.socketpair()
        guest_sock.setblocking(False)
        self.guest_sock = guest_sock
        self.agent = _FakeAgent(mod, guest_sock.fileno())
        self.agent_thread = threading.Thread(target=self._run_agent, daemon=True)
        self.agent_thread.start()
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []  # asyncio's "exception never retrieved"...
        self.loop.set_exception_handler(lambda _, ctx: self.loop_errors.append(ctx))
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.loop_thread.start()

        async def setup() -> tuple[AgentConnection, AsyncPorts, _FakeSandbox]:
            reader, writer = await asyncio.open_connection(sock=host_sock)
            conn = AgentConnection(reader, writer)
            await conn.handshake(timeout=5)
            sb = _FakeSandbox(conn)
            return conn, AsyncPorts(sb), sb  # type: ignore[arg-type]

        self.conn, self.ports, self.sb = self.run(setup())

    def _run_agent(self) -> None:
        with contextlib.suppress(SystemExit):
            self.agent.loop.run()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.ports._shutdown())
        self.run(self.conn.close())
        self.agent.stop = True
        self.agent_thread.join(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(5)
        self.guest_sock.close()
        assert not self.loop_errors, self.loop_errors


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


class HostServer:
    """SERVER on this machine's loopback (it plays the guest's server)."""

    def __init__(self, mode: str, tmp: Path) -> None:
        self.log = tmp / f"log-{mode}"
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, mode, "0", str(self.log)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[0] == "ready", line
        self.port = int(line[1])

    def notes(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def host_server(tmp_path: Path) -> Iterator[Callable[[str], HostServer]]:
    servers: list[HostServer] = []

    def start(mode: str) -> HostServer:
        servers.append(HostServer(mode, tmp_path))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_rig_echo_many_and_half_close(rig: Rig, host_server: Callable[[str], HostServer]
                                      ) -> None:
    srv = host_server("echo")
    url = rig.run(rig.ports.expose(srv.port))
    assert url.host == "127.0.0.1" and url.guest_port == srv.port
    assert rig.run(rig.ports.expose(srv.port)) is url  # idempotent
    payloads = [os.urandom(1000 + 50_000 * i) for i in range(12)]
    assert _echo_concurrently(url.port, payloads) == [True] * len(payloads)
    assert rig.run(rig.ports.close(srv.port)) == 1
    assert rig.run(rig.ports.list()) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", url.port), timeout=5)


def test_rig_tunnel_cap_per_sandbox(rig: Rig) -> None:
    """MAX_TUNNELS (512) tunnels per sandbox: connections to an exposed port beyond it
    are reset at once, ports.connect refuses with PortError; each tunnel's host
    descriptor is taken from the process's budget and given back when it ends."""
    from sandvm.fds import BUDGET
    from sandvm.ports import MAX_TUNNELS

    target = socket.socket()  # the "guest's" server: completes connects, never accepts
    target.bind(("127.0.0.1", 0))
    target.listen(1024)
    url = rig.run(rig.ports.expose(target.getsockname()[1]))
    clients: list[socket.socket] = []
    try:
        assert BUDGET.held_by("sb-rig") == 1  # the listener
        extra = 40
        reset_at_connect = 0  # a refused connection may be reset before connect returns
        for _ in range(MAX_TUNNELS + extra):
            try:
                clients.append(socket.create_connection(("127.0.0.1", url.port),
                                                        timeout=30))
            except ConnectionResetError:
                reset_at_connect += 1
        _poll(lambda: rig.ports.tunnels == MAX_TUNNELS)

        def reset() -> int:
            n = reset_at_connect
            for c in clients:
                c.setblocking(False)
                try:
                    n += c.recv(1) == b""
                except (ConnectionResetError, BrokenPipeError):
                    n += 1
                except BlockingIOError:
                    pass
            return n

        assert _poll(lambda: reset() == extra, timeout=60)
        assert rig.ports.tunnels == MAX_TUNNELS and rig.ports.refused >= extra
        assert BUDGET.held_by("sb-rig") == MAX_TUNNELS + 1
        with pytest.raises(PortError, match="tunnels open"):
            rig.run(rig.ports.connect(target.getsockname()[1]))
    finally:
        for c in clients:
            c.close()
        target.close()  # its queued connections are reset: the tunnels end
        _poll(lambda: rig.ports.tunnels == 0, timeout=60)
        rig.run(rig.ports.close(url))
    assert rig.ports.tunnels == 0 and BUDGET.held_by("sb-rig") == 0


def test_rig_descriptor_budget(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's descriptor budget covers listeners and accepted connections: one
    it does not cover is reset at once (and counted), a listener it does not cover is
    ResourceExhausted; what ends gives its descriptors back."""
    from sandvm import ports
    from sandvm.errors import ResourceExhausted
    from sandvm.fds import MIN_RESERVE, FdBudget

    tight = FdBudget(limit=MIN_RESERVE + 12)  # this sandbox's share: 3 descriptors
    monkeypatch.setattr(ports, "BUDGET", tight)
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(16)
    url = rig.run(rig.ports.expose(target.getsockname()[1]))
    other = rig.run(rig.ports.expose(target.getsockname()[1], host="127.0.0.2"))
    clients: list[socket.socket] = []
    try:
        refused = rig.ports.refused
        for _ in range(2):
            # the refused one may be reset before connect() returns on a loaded machine
            with contextlib.suppress(ConnectionResetError):
                clients.append(socket.create_connection(("127.0.0.1", url.port), timeout=30))
        assert _poll(lambda: rig.ports.refused == refused + 1)
        assert rig.ports.tunnels == 1 and tight.held_by("sb-rig") == 3
        with pytest.raises(ResourceExhausted, match="share"):
            rig.run(rig.ports.expose(target.getsockname()[1], host="127.0.0.3"))
    finally:
        for c in clients:
            c.close()
        target.close()
        _poll(lambda: rig.ports.tunnels == 0)
        rig.run(rig.ports.close(url))
        rig.run(rig.ports.close(other))
    assert tight.held == 0


def test_rig_guest_half_close_first(rig: Rig, host_server: Callable[[str], HostServer]
                                    ) -> None:
    srv = host_server("first")
    url = rig.run(rig.ports.expose(srv.port))
    with _connect(url.port) as s:
        assert _recv_all(s) == b"hello"  # the server's EOF came through...
        s.sendall(b"x" * 300_000)  # ...and our direction still works
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    assert _poll(lambda: srv.notes()) == ["got 300000"]


def test_rig_reset_both_ways(rig: Rig, host_server: Callable[[str], HostServer]) -> None:
    rst = host_server("rst")
    url = rig.run(rig.ports.expose(rst.port))
    with _connect(url.port) as s:
        s.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            s.recv(10)
    watch = host_server("watch")
    url = rig.run(rig.ports.expose(watch.port))
    s = _connect(url.port)
    s.sendall(b"abc")
    time.sleep(0.2)
    _rst_close(s)
    with _connect(url.port) as s:
        s.sendall(b"abc")
    assert _poll(lambda: len(watch.notes()) == 2) and sorted(watch.notes()) == ["eof", "reset"]


def test_rig_connect_stream_and_errors(rig: Rig, host_server: Callable[[str], HostServer]
                                       ) -> None:
    srv = host_server("echo")

    async def go() -> None:
        s = await rig.ports.connect(srv.port)
        async with s:
            s.write(b"ping " * 1000)
            await s.drain()
            await s.write_eof()
            got = b""
            while chunk := await s.read(777):
                got += chunk
            assert got == b"ping " * 1000
            with pytest.raises(PortError):
                s.write(b"after eof")
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            unused = free.getsockname()[1]
            with pytest.raises(PortRefused):
                await rig.ports.connect(unused)
            t0 = time.monotonic()
            with pytest.raises(PortTimeout):
                await rig.ports.wait(unused, timeout=0.3)
            assert time.monotonic() - t0 < 2
        await rig.ports.wait(srv.port, timeout=5)
        # a timed-out read loses nothing
        s = await rig.ports.connect(srv.port)
        with pytest.raises(PortTimeout):
            await s.read(10, timeout=0.2)
        await s.sendall(b"late")
        assert await s.read(10, timeout=5) == b"late"
        await s.abort()

    rig.run(go())


def test_rig_guest_refuses_bad_targets(rig: Rig) -> None:
    bad: list[dict[str, Any]] = [
        {"port": 0}, {"port": 65536}, {"port": "80"}, {"port": True}, {},
        {"port": 80, "host": "10.0.0.1"}, {"port": 80, "host": "0.0.0.0"},
        {"port": 80, "host": "127.1"}, {"port": 80, "host": "example.com"},
        {"port": 80, "host": "::"}, {"port": 80, "host": 5}, {"port": 80, "host": "\x00"},
    ]
    for req in bad:
        for op in ("tcp_connect", "tcp_listening"):
            with pytest.raises(GuestError) as ei:
                rig.run(rig.conn.call({"op": op, **req}, timeout=5))
            assert ei.value.details.get("guest_code") == "invalid_request", (op, req)


def test_rig_hostile_tunnel_frames(rig: Rig, host_server: Callable[[str], HostServer]
                                   ) -> None:
    srv = host_server("echo")

    async def go() -> None:
        st = await rig.conn.open({"op": "tcp_connect", "port": srv.port})
        item = await st.next(5)
        assert item.message == {"event": "connected"}
        # stdout-channel data from the host is a protocol violation: the guest resets
        await st.send_data(b"x", channel=wire.CH_STDOUT)
        item = await st.next(5)
        assert item.kind == "error"

    rig.run(go())
    assert rig.run(rig.conn.ping()) < 5  # the channel itself is fine


def test_rig_shutdown_ends_listeners_and_tunnels(host_server: Callable[[str], HostServer]
                                                 ) -> None:
    srv = host_server("echo")
    r = Rig()
    try:
        url = r.run(r.ports.expose(srv.port))
        s = _connect(url.port)
        s.sendall(b"hi")
        assert s.recv(2) == b"hi"
        r.sb.closed = True
        r.run(r.ports._shutdown())
        with pytest.raises(ConnectionResetError):
            s.recv(1)  # the open tunnel was reset...
        with pytest.raises(ConnectionRefusedError):  # ...and nothing listens any more
            socket.create_connection(("127.0.0.1", url.port), timeout=5)
        with pytest.raises(SandboxStateError):
            r.run(r.ports.expose(srv.port))
        s.close()
    finally:
        r.close()


# --------------------------------------------------------------------------- QEMU


class GuestServer:
    """SERVER in the guest, as a background command."""

    def __init__(self, sb: Any, mode: str, port: int) -> None:
        self.sb, self.port = sb, port
        self.log = f"/tmp/srv-{port}"
        sb.files.write("/tmp/srv.py", SERVER)
        sb.commands.run(f"rm -f {self.log}")
        self.handle = sb.commands.run(["python3", "/tmp/srv.py", mode, str(port)],
                                      background=True)
        sb.ports.wait(port, timeout=30)

    def notes(self) -> list[str]:
        r = self.sb.commands.run(f"cat {self.log} 2>/dev/null", check=False)
        return r.stdout.splitlines()

    def stop(self) -> None:
        self.handle.kill()
        with contextlib.suppress(SandvmError):
            self.handle.wait()


@pytest.fixture
def guest_server(sandbox: Any) -> Iterator[Callable[[str, int], GuestServer]]:
    servers: list[GuestServer] = []

    def start(mode: str, port: int) -> GuestServer:
        servers.append(GuestServer(sandbox, mode, port))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()
    for url in sandbox.ports.list():
        sandbox.ports.close(url)


@pytest.mark.qemu
def test_expose_http_server(sandbox: Any) -> None:
    sandbox.files.write("/tmp/www/hello.txt", "hi from the guest\n")
    h = sandbox.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 --directory"
                             " /tmp/www", background=True)
    try:
        url = sandbox.ports.expose(8000)
        assert isinstance(url, str) and url.startswith("http://127.0.0.1:")
        assert (url.host, url.guest_port) == ("127.0.0.1", 8000)
        sandbox.ports.wait(8000, timeout=30)
        with urllib.request.urlopen(url + "/hello.txt", timeout=30) as resp:
            assert resp.read() == b"hi from the guest\n"
        # bound to loopback by default
        lst = sandbox._a.ports._listeners[("127.0.0.1", url.port)]
        assert lst.server.sockets[0].getsockname()[0] == "127.0.0.1"
        # an explicit bind address, and a second listener on the same guest port
        wide = sandbox.ports.expose(8000, host="0.0.0.0")
        assert wide.host == "0.0.0.0" and wide.port != url.port
        with urllib.request.urlopen(f"http://127.0.0.1:{wide.port}/hello.txt",
                                    timeout=30) as resp:
            assert resp.read() == b"hi from the guest\n"
        assert sandbox.ports.list() == sorted([url, wide], key=lambda u: u.port)
        assert sandbox.ports.close(8000) == 2
    finally:
        h.kill()


@pytest.mark.qemu
def test_concurrent_connections_and_integrity(sandbox: Any, guest_server: Any) -> None:
    guest_server("echo", 17001)
    guest_server("sink", 17002)
    guest_server("source", 17003)
    echo, sink, source = (sandbox.ports.expose(p) for p in (17001, 17002, 17003))
    payloads = [os.urandom(20_000 + 7_000 * i) for i in range(16)]
    assert _echo_concurrently(echo.port, payloads) == [True] * len(payloads)

    big = os.urandom(20 << 20)
    with _connect(sink.port) as s:
        s.sendall(big)
        s.shutdown(socket.SHUT_WR)
        assert _recv_all(s).decode() == f"{len(big)} {hashlib.sha256(big).hexdigest()}"
    with _connect(source.port) as s:
        s.sendall(b"%d\n" % (20 << 20))
        got = _recv_all(s)
    assert len(got) == 64 + (20 << 20)
    assert hashlib.sha256(got[64:]).hexdigest().encode() == got[:64]


@pytest.mark.qemu
def test_half_close_and_reset_propagate(sandbox: Any, guest_server: Any) -> None:
    first = guest_server("first", 17011)
    guest_server("rst", 17012)
    watch = guest_server("watch", 17013)
    url = sandbox.ports.expose(17011)
    with _connect(url.port) as s:
        assert _recv_all(s) == b"hello"  # the guest server's half-close reached us...
        s.sendall(b"y" * 100_000)  # ...and the other direction still flows
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    assert _poll(first.notes) == ["got 100000"]
    # the guest's server resets: the host client sees a RST
    with _connect(sandbox.ports.expose(17012).port) as s:
        s.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            s.recv(10)
    # the host client resets: the guest's server sees ECONNRESET; a clean close is EOF
    port = sandbox.ports.expose(17013).port
    s = _connect(port)
    s.sendall(b"abc")
    time.sleep(0.3)
    _rst_close(s)
    with _connect(port) as s:
        s.sendall(b"abc")
    assert _poll(lambda: len(watch.notes()) == 2)
    assert sorted(watch.notes()) == ["eof", "reset"]


@pytest.mark.qemu
def test_wait_connect_and_errors(sandbox: Any) -> None:
    t0 = time.monotonic()
    with pytest.raises(PortTimeout) as ei:
        sandbox.ports.wait(17021, timeout=0.5)
    assert time.monotonic() - t0 < 3 and "17021" in ei.value.message
    with pytest.raises(PortRefused):
        sandbox.ports.connect(17021)
    sandbox.files.write("/tmp/srv.py", SERVER)
    h = sandbox.commands.run("sleep 0.5; exec python3 /tmp/srv.py echo 17021",
                             background=True)
    try:
        sandbox.ports.wait(17021, timeout=30)
        with sandbox.ports.connect(17021) as s:
            s.settimeout(30)
            s.sendall(b"through the channel")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(5):
                got += chunk
        assert got == b"through the channel"

        async def via_async() -> bytes:
            s = await sandbox._a.ports.connect(17021)
            async with s:
                s.write(b"async")
                await s.drain()
                await s.write_eof()
                return await s.read()

        assert _portal.call(via_async()) == b"async"
    finally:
        h.kill()
    for bad in (0, 65536, "80", True, -1):
        with pytest.raises(InvalidSpec):
            sandbox.ports.expose(bad)
        with pytest.raises(InvalidSpec):
            sandbox.ports.wait(bad)
    with pytest.raises(InvalidSpec):
        sandbox.ports.expose(80, host="example.com")
    with pytest.raises(InvalidSpec):
        sandbox.ports.connect(80, guest_host="10.0.2.2")
    with pytest.raises(InvalidSpec):
        sandbox.ports.wait(80, timeout=0)
    # the guest refuses what the host would never send
    for req in ({"port": 0}, {"port": 80, "host": "10.0.0.1"}, {"port": "80"}):
        with pytest.raises(GuestError) as gi:
            _portal.call(sandbox._a._conn().call({"op": "tcp_connect", **req}, timeout=10))
        assert gi.value.details.get("guest_code") == "invalid_request"


@pytest.mark.qemu
def test_listeners_end_with_the_sandbox(base_snapshot: Any, snapshot_store: Any) -> None:
    sb = sandvm.Sandbox.from_snapshot(base_snapshot, store=snapshot_store)
    try:
        url = sb.ports.expose(17031)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(sandvm.errors.PortInUse):
                sb.ports.expose(17032, host_port=taken.getsockname()[1])
        # nothing listens in the guest: the tunnel is reset (a RST, never a clean EOF),
        # the listener stays
        with _connect(url.port) as s, pytest.raises(ConnectionResetError):
            s.recv(1)
    finally:
        sb.kill()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", url.port), timeout=5)
    with pytest.raises(SandboxStateError):
        sb.ports.expose(17031)
    assert sb.ports.list() == []


# --------------------------------------------------------------------------- CLI

SANDVM = str(Path(sys.executable).parent / "sandvm")


def test_cli_publish_errors_before_booting() -> None:
    r = subprocess.run([SANDVM, "run", "-p", "8000/udp", "--", "true"], capture_output=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and b"only TCP" in r.stderr
    r = subprocess.run([SANDVM, "run", "-p", "x:80", "--", "true"], capture_output=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and b"port spec" in r.stderr


@pytest.mark.qemu
def test_cli_run_publishes_a_port() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        host_port = free.getsockname()[1]
    script = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 8000)); s.listen();"
              " c, _ = s.accept(); c.sendall(b'hi from the guest'); c.close()")
    proc = subprocess.Popen([SANDVM, "run", "-p", f"{host_port}:8000", "--", "python3", "-c",
                             script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not got:
            try:
                with _connect(host_port) as s:
                    got = _recv_all(s)
            except OSError:  # not listening yet, or the guest's server not yet up
                time.sleep(0.2)
        assert got == b"hi from the guest"
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"http://127.0.0.1:{host_port}".encode() in err
    finally:
        proc.kill()
        proc.wait()


def test_decoder_keeps_nothing_of_a_reused_read_buffer() -> None:
    # the agent feeds the decoder views of one reused read buffer
    frames = wire.encode_data(3, 0, b"a" * 1000) + wire.encode_data(5, 0, b"b" * 3000)
    buf = bytearray(4096)
    view = memoryview(buf)
    dec = wire.FrameDecoder()
    buf[:2000] = frames[:2000]
    got = dec.feed(view[:2000])
    buf[:] = b"\xff" * len(buf)  # the next read overwrites it
    buf[:len(frames) - 2000] = frames[2000:]
    got += dec.feed(view[:len(frames) - 2000])
    assert got == [(wire.DATA, 3, b"\x00" + b"a" * 1000), (wire.DATA, 5, b"\x00" + b"b" * 3000)]
