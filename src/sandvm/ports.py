"""Port exposure: host listeners and socket-like streams tunneled to guest TCP ports.

The VM has no network device. A tunnel is one agent stream (op ``tcp_connect``):
the agent connects to a loopback port in the guest and pipes the socket both ways
over the multiplexed channel, host → guest on channel 0 and guest → host on
channel 1, each direction under the stream's own flow-control window, so one
busy connection never stalls the others and neither side buffers more than a
window. EOF frames carry half-closes; a RESET carries an abortive close (the
other end is closed with ``SO_LINGER`` 0, i.e. a TCP RST), both ways.

``ports.expose`` listens on the host (127.0.0.1 unless asked otherwise) and opens
one tunnel per accepted connection; ``ports.connect`` opens one tunnel and hands
it to the caller as a stream; ``ports.wait`` polls the guest's
/proc/net/tcp{,6} until something listens. Listeners and tunnels end with the
sandbox. Whatever the guest sends is checked: data only on channel 1, no item
before the connection is up, a bounded number of tunnels per sandbox (MAX_TUNNELS,
exposed connections and ``connect`` streams together). Listeners and accepted
connections take descriptors from the process's budget (:mod:`sandvm.fds`): a
connection it does not cover is reset at once and logged (``sandvm.ports``).

The values (``ExposedPort``, ``PortMapping``) and the checks of ports and addresses are
in :mod:`sandvm.portspec`; this module re-exports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
import weakref
from typing import TYPE_CHECKING, Any

from sandvm import _portal, wire
from sandvm.agent_client import AgentConnection, HostStream, StreamItem, require_feature
from sandvm.errors import (
    AgentProtocolError,
    AgentTimeout,
    InvalidSpec,
    PortError,
    PortInUse,
    PortReset,
    PortTimeout,
    ResourceExhausted,
    SandvmError,
)
from sandvm.fds import BUDGET, raise_nofile_limit
from sandvm.guestops import GuestOps
from sandvm.portspec import (
    DEFAULT_BIND,
    DEFAULT_WAIT,
    GUEST_LOOPBACK,
    ExposedPort,
    PortMapping,
    check_bind_host,
    check_guest_host,
    check_port,
    parse_publish,
)

if TYPE_CHECKING:
    from sandvm.link import SandboxLink

__all__ = [  # the values and checks live in sandvm.portspec
    "DEFAULT_BIND",
    "DEFAULT_WAIT",
    "GUEST_LOOPBACK",
    "AsyncPortStream",
    "AsyncPorts",
    "ExposedPort",
    "PortMapping",
    "PortStream",
    "Ports",
    "check_bind_host",
    "check_guest_host",
    "check_port",
    "parse_publish",
]

MAX_TUNNELS = 512  # open tunnels per sandbox (the channel carries at most 1024 streams)
LINGER = 30.0  # how long a closed stream waits for the guest's side to close too
_CHUNK = wire.DATA_CHUNK
_PROBE_PAUSE = (0.01, 0.25)  # first and largest pause between readiness probes
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST
log = logging.getLogger("sandvm.ports")


# --------------------------------------------------------------------------- helpers


def _tunnel_error(err: SandvmError | None, port: int) -> SandvmError:
    """A stream's error as the error of a tunnel: PortErrors as they are, the rest
    (the channel broke, the VM died) as PortReset caused by it."""
    if isinstance(err, PortError):
        return err
    msg = err.message if err is not None else "the stream ended"
    exc = PortReset(f"the tunnel to guest port {port} broke: {msg}")
    exc.__cause__ = err
    return exc


def _abort_writer(writer: asyncio.StreamWriter) -> None:
    """Close a host connection abortively: the client sees a RST, as if the guest's
    server had reset it."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    writer.transport.abort()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# --------------------------------------------------------------------------- streams


class AsyncPortStream:
    """A TCP connection to a guest port (``await sb.ports.connect(port)``), shaped like
    asyncio's streams: ``read``, ``write`` + ``drain``, ``write_eof`` (half-close),
    ``close``, ``abort`` (a RST to the guest's server). ``async with`` closes it."""

    def __init__(self, stream: HostStream, ports: AsyncPorts, guest_port: int) -> None:
        self._st = stream
        self._ports = ports
        self.guest_port = guest_port
        self._chunk = b""  # the last DATA chunk...
        self._pos = 0  # ...read up to here
        self._wbuf: list[bytes] = []
        self._eof = False  # the guest's side half-closed, or the stream ended
        self._eof_sent = False
        self._closed = False
        self._error: SandvmError | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    async def _item(self, timeout: float | None) -> StreamItem:
        try:
            item = await self._st.next(timeout)
        except AgentTimeout:
            raise PortTimeout(f"no data from guest port {self.guest_port} within"
                              f" {timeout} s") from None
        if item.kind == "data" and item.channel != wire.CH_STDOUT:
            await self._st.reset()
            self._error = AgentProtocolError(f"guest sent tunnel data on channel {item.channel}")
            raise self._error
        if item.kind in ("eof", "reply"):
            self._eof = True
        elif item.kind == "error":
            self._eof = True
            self._error = _tunnel_error(item.error, self.guest_port)
        return item

    async def read(self, n: int = -1, *, timeout: float | None = None) -> bytes:
        """Up to ``n`` bytes (-1: whatever arrived next), ``b""`` once the guest's side
        closed its end (or after ``close``). Raises PortReset if the connection was
        reset, PortTimeout if nothing came within ``timeout`` seconds."""
        if n == 0:
            return b""
        while self._pos >= len(self._chunk):
            if self._error is not None:
                raise self._error
            if self._eof or self._closed:
                return b""
            item = await self._item(timeout)
            if item.kind == "data":
                self._chunk, self._pos = item.data, 0
        chunk, pos = self._chunk, self._pos
        end = len(chunk) if n < 0 else min(len(chunk), pos + n)
        self._pos = end
        return chunk if pos == 0 and end == len(chunk) else chunk[pos:end]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for the guest; ``drain`` sends them. Raises PortError after
        ``write_eof`` or ``close``."""
        if self._eof_sent or self._closed:
            raise PortError(f"the connection to guest port {self.guest_port} is closed for"
                            " writing")
        if data:
            self._wbuf.append(bytes(data))

    async def drain(self, *, timeout: float | None = None) -> None:
        """Send what ``write`` queued, as fast as the guest's side takes it. Raises
        PortReset if the connection is gone, PortTimeout if the guest took nothing for
        ``timeout`` seconds."""
        while self._wbuf:
            chunk = self._wbuf.pop(0)
            try:
                await self._st.send_data(chunk, channel=wire.CH_STDIN, timeout=timeout)
            except AgentTimeout:
                self._wbuf.clear()
                raise PortTimeout(f"guest port {self.guest_port} took no data for"
                                  f" {timeout} s") from None
            except SandvmError as exc:
                self._wbuf.clear()
                if self._error is None:
                    self._error = _tunnel_error(exc, self.guest_port)
                raise self._error from None

    async def sendall(self, data: bytes | bytearray | memoryview, *,
                      timeout: float | None = None) -> None:
        """``write`` + ``drain``."""
        self.write(data)
        await self.drain(timeout=timeout)

    async def write_eof(self) -> None:
        """Half-close: the guest's server reads EOF; reading from it goes on."""
        await self.drain()
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(SandvmError):
                await self._st.send_eof(wire.CH_STDIN)

    async def close(self) -> None:
        """Close gracefully: queued bytes are sent, then EOF. Like a socket's close,
        data the guest sends afterwards resets the connection; the guest's side is
        given LINGER seconds to close its end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._st.closed:
            return
        with contextlib.suppress(SandvmError):
            await self.drain()
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(SandvmError):
                await self._st.send_eof(wire.CH_STDIN)
        if self._pos < len(self._chunk):
            await self._st.reset()  # unread data: a socket would send a RST
        else:
            self._ports._linger(self._st)

    async def abort(self) -> None:
        """Close abortively: the guest's server sees a connection reset. Idempotent."""
        self._closed = True
        self._wbuf.clear()
        await self._st.reset()

    async def __aenter__(self) -> AsyncPortStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class PortStream:
    """Sync twin of AsyncPortStream, shaped like a socket: ``sendall``, ``send``,
    ``recv``, ``shutdown(SHUT_WR)``, ``close``, ``abort``, ``settimeout``; a context
    manager. Errors are PortReset (a ConnectionResetError), PortTimeout (a
    TimeoutError), PortError."""

    def __init__(self, inner: AsyncPortStream) -> None:
        self._a = inner
        self._timeout: float | None = None
        self._rd_shut = False

    @property
    def guest_port(self) -> int:
        return self._a.guest_port

    def settimeout(self, timeout: float | None) -> None:
        """Seconds ``recv``/``sendall`` may wait (None: forever). Raises InvalidSpec."""
        if timeout is not None and not timeout > 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, not {timeout!r}")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        _portal.call(self._a.sendall(data, timeout=self._timeout))

    def send(self, data: bytes | bytearray | memoryview) -> int:
        self.sendall(data)
        return len(data)

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes; ``b""`` at EOF."""
        if not isinstance(bufsize, int) or bufsize < 0:
            raise InvalidSpec(f"bufsize must be a non-negative int, not {bufsize!r}")
        if self._rd_shut:
            return b""
        return _portal.call(self._a.read(bufsize, timeout=self._timeout))

    def shutdown(self, how: int) -> None:
        """SHUT_WR sends EOF to the guest's server (a half-close); SHUT_RD makes
        ``recv`` return b""; SHUT_RDWR both."""
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise InvalidSpec(f"shutdown takes SHUT_RD, SHUT_WR or SHUT_RDWR, not {how!r}")
        if how != socket.SHUT_WR:
            self._rd_shut = True
        if how != socket.SHUT_RD:
            _portal.call(self._a.write_eof())

    def close(self) -> None:
        _portal.call(self._a.close())

    def abort(self) -> None:
        """Reset the connection (the guest's server sees ECONNRESET)."""
        _portal.call(self._a.abort())

    def __enter__(self) -> PortStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- listeners


class _Listener:
    def __init__(self, addr: ExposedPort, guest_host: str) -> None:
        self.addr = addr
        self.guest_host = guest_host
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()


async def pump_to_guest(reader: asyncio.StreamReader, st: HostStream) -> None:
    """Client → guest over the tunnel stream ``st`` until the client's EOF (sent on) or
    reset (the stream is reset); for the port tunnels here and the egress bridge in
    ``network``. Never raises a sandvm error (the stream ending ends it)."""
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                await st.send_eof(wire.CH_STDIN)
                return
            await st.send_data(data, channel=wire.CH_STDIN, timeout=None)
    except OSError:  # the client reset its connection
        await st.reset()
    except SandvmError:
        pass  # the stream ended: the download side closes the client


async def pump_from_guest(st: HostStream, writer: asyncio.StreamWriter) -> bool:
    """Guest → client from the tunnel stream ``st`` until it ends; True if it ended
    cleanly (REPLY). For the port tunnels here and the egress bridge in ``network``.
    Raises what ``st.next`` raises (AgentError when the channel is gone)."""
    while True:
        item = await st.next(None)
        if item.kind == "data":
            if item.channel != wire.CH_STDOUT or writer.is_closing():
                return False
            writer.write(item.data)
            try:
                await writer.drain()
            except OSError:
                return False
        elif item.kind == "eof":
            if writer.can_write_eof() and not writer.is_closing():
                with contextlib.suppress(OSError):
                    writer.write_eof()
        elif item.kind == "reply":
            return True
        elif item.kind == "error":
            return False


async def _pipe(conn: AgentConnection, port: int, guest_host: str,
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One accepted host connection ↔ one tunnel. The client's bytes are sent on at once
    (the guest holds them until its connect completes): no round trip before data."""
    try:
        st = await GuestOps(conn).tcp_connect(port=port, host=guest_host, notify=False)
    except SandvmError:
        _abort_writer(writer)
        return
    up = asyncio.get_running_loop().create_task(pump_to_guest(reader, st))
    up.add_done_callback(_retrieve)
    clean = False
    try:
        clean = await pump_from_guest(st, writer)
    finally:
        up.cancel()
        if clean:
            writer.close()
        else:
            await st.reset()
            _abort_writer(writer)


# --------------------------------------------------------------------------- namespace


class AsyncPorts:
    """``sandbox.ports``: reach TCP servers in the guest from the host (no network device:
    every connection is tunneled through the agent channel)."""

    def __init__(self, sb: SandboxLink) -> None:
        raise_nofile_limit()  # once per process: every sandbox gets here
        self._sb = sb
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # tunnels and lingering closes
        self._streams: weakref.WeakSet[AsyncPortStream] = weakref.WeakSet()  # connect()'s
        self._ended = False
        self.refused = 0  # connections refused (MAX_TUNNELS, the descriptor budget)
        self._logged = 0.0

    @property
    def tunnels(self) -> int:
        """Tunnels open now: exposed ports' connections (and lingering closes) and
        ``connect`` streams not closed."""
        return len(self._tasks) + sum(1 for s in self._streams
                                      if not s._closed and not s._st.closed)

    def _refused(self, why: str) -> None:
        """Count (and log, at most once a second) a connection refused for ``why``."""
        self.refused += 1
        now = time.monotonic()
        if now - self._logged >= 1.0:
            self._logged = now
            log.warning("sandbox %s: a tunnel was refused (%d so far): %s",
                        self._sb.sandbox_id, self.refused, why)

    def _conn(self) -> AgentConnection:
        # raises if the sandbox is gone
        return require_feature(self._sb.connection(), "tcp", "TCP tunnels", PortError)

    def _track(self, task: asyncio.Task[Any], listener: _Listener | None = None) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if listener is not None:
            listener.tasks.add(task)
            task.add_done_callback(listener.tasks.discard)

    async def expose(self, port: int, *, host: str = DEFAULT_BIND, host_port: int = 0,
                     guest_host: str = GUEST_LOOPBACK) -> ExposedPort:
        """Listen on ``host``:``host_port`` (0: a free port) and tunnel every connection
        to ``guest_host``:``port`` in the guest; return the listener's URL.

        Listens on 127.0.0.1 unless ``host`` says otherwise (``0.0.0.0`` opens it to
        the network). Exposing a guest port again with the same ``host`` and no
        ``host_port`` returns the existing listener. Connections made before the
        guest's server listens are reset. Allowed while the sandbox runs; the
        listener ends with it or with ``close``. Raises InvalidSpec, PortInUse,
        PortError, SandboxStateError, ResourceExhausted (the process's descriptor
        budget; then connections beyond it are reset too).
        """
        port = check_port(port)
        host = check_bind_host(host)
        host_port = check_port(host_port, "host_port", allow_zero=True)
        guest_host = check_guest_host(guest_host)
        self._conn()
        for lst in self._listeners.values():
            a = lst.addr
            if (a.guest_port, lst.guest_host, a.host) == (port, guest_host, host) and \
                    host_port in (0, a.port):
                return a
        holder: list[_Listener] = []

        sid = self._sb.sandbox_id

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if not holder or self._ended or task is None:
                _abort_writer(writer)
                return
            why = None
            if self.tunnels >= MAX_TUNNELS:
                why = f"too many tunnels open ({MAX_TUNNELS})"
            else:
                why = BUDGET.acquire(sid, 1)  # the accepted connection's descriptor
            if why is not None:
                self._refused(why)
                _abort_writer(writer)
                return
            self._track(task, holder[0])
            try:
                # the client's bytes follow the OPEN at once: no need to hear of the connect
                await _pipe(self._conn(), port, guest_host, reader, writer)
            except SandvmError:
                _abort_writer(writer)
            except asyncio.CancelledError:
                # the listener or the sandbox is closing: the client gets a RST. Not
                # re-raised: asyncio's streams log a cancelled handler task as an error
                _abort_writer(writer)
            finally:
                BUDGET.release(sid, 1)

        why = BUDGET.acquire(sid, 1)  # the listener's own descriptor
        if why is not None:
            raise ResourceExhausted(f"cannot listen for guest port {port}: {why}")
        try:
            server = await asyncio.start_server(serve, host, host_port, limit=_CHUNK,
                                                backlog=128)
        except OSError as exc:
            BUDGET.release(sid, 1)
            where = f"{host}:{host_port}"
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"cannot listen on {where}: the address is in use; choose"
                                " another host_port, or 0 for a free one") from exc
            if exc.errno == errno.EACCES:
                raise PortInUse(f"cannot listen on {where}: permission denied (ports below"
                                " 1024 need privileges); choose another host_port") from exc
            raise PortError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
        if self._ended:  # the sandbox ended meanwhile
            server.close()
            BUDGET.release(sid, 1)
            self._sb.connection()
        bound = server.sockets[0].getsockname()[1]
        lst = _Listener(ExposedPort(host, bound, port), guest_host)
        lst.server = server
        holder.append(lst)
        self._listeners[(host, bound)] = lst
        return lst.addr

    async def wait(self, port: int, *, timeout: float = DEFAULT_WAIT,
                   guest_host: str = GUEST_LOOPBACK) -> None:
        """Return once a server in the guest listens where a tunnel to ``port`` connects
        (on ``guest_host``, 0.0.0.0 or ::). Polls the guest's socket table with
        backoff; opens no connection. Allowed while the sandbox runs. Raises
        PortTimeout after ``timeout`` seconds, InvalidSpec, SandboxStateError.
        """
        port = check_port(port)
        guest_host = check_guest_host(guest_host)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidSpec(f"timeout must be positive seconds, not {timeout!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = _PROBE_PAUSE[0]
        while True:
            remaining = deadline - loop.time()
            try:
                listening = await GuestOps(self._conn()).tcp_listening(
                    port=port, host=guest_host,
                    timeout=min(self._sb.op_timeout, max(remaining, 1.0)))
            except AgentTimeout:
                if loop.time() < deadline:
                    raise
                listening = False
            if listening:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                anyaddr = "::" if ":" in guest_host else "0.0.0.0"
                raise PortTimeout(f"nothing listens on guest port {port} after {timeout} s:"
                                  f" is the server running, and bound to {guest_host} or"
                                  f" {anyaddr}?")
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 1.5, _PROBE_PAUSE[1])

    async def connect(self, port: int, *, timeout: float | None = None,
                      guest_host: str = GUEST_LOOPBACK) -> AsyncPortStream:
        """A TCP connection to ``guest_host``:``port`` in the guest, as a stream (no host
        listener involved). ``timeout`` bounds the connect (default: the sandbox's
        op_timeout). Allowed while the sandbox runs. Raises PortRefused if nothing
        listens there, PortTimeout, InvalidSpec, SandboxStateError, PortError when
        MAX_TUNNELS are open.
        """
        port = check_port(port)
        guest_host = check_guest_host(guest_host)
        limit = self._sb.op_timeout if timeout is None else timeout
        if not limit > 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, not {timeout!r}")
        conn = self._conn()
        if self.tunnels >= MAX_TUNNELS:
            self._refused(f"too many tunnels open ({MAX_TUNNELS})")
            raise PortError(f"this sandbox has {MAX_TUNNELS} tunnels open, its cap: close"
                            " some (streams from ports.connect, connections to exposed"
                            " ports)")
        st = await GuestOps(conn).tcp_connect(port=port, host=guest_host)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            while True:
                try:
                    item = await st.next(max(0.0, deadline - loop.time()))
                except AgentTimeout:
                    raise PortTimeout(f"connecting to guest port {port} took more than"
                                      f" {limit} s") from None
                if item.kind == "error":
                    raise _tunnel_error(item.error, port)
                if item.kind != "event":
                    raise AgentProtocolError(f"guest sent {item.kind} before the tunnel was"
                                             " connected")
                if (item.message or {}).get("event") == "connected":
                    stream = AsyncPortStream(st, self, port)
                    self._streams.add(stream)
                    return stream
        except BaseException:
            await st.reset()
            raise

    async def list(self) -> list[ExposedPort]:
        """The listeners open now, by host port (none once the sandbox ended)."""
        return sorted((lst.addr for lst in self._listeners.values()), key=lambda a: a.port)

    async def close(self, port: int | ExposedPort) -> int:
        """Stop exposing: an ExposedPort closes that listener, a guest port number all of
        its listeners; their open connections are reset. Returns how many listeners
        were closed (0 if none matched). Allowed in any state; raises InvalidSpec for a
        port number outside 1..65535."""
        if isinstance(port, ExposedPort):
            keys = [k for k, v in self._listeners.items() if v.addr is port or
                    (v.addr.host, v.addr.port) == (port.host, port.port)]
        else:
            port = check_port(port)
            keys = [k for k, v in self._listeners.items() if v.addr.guest_port == port]
        for key in keys:
            await self._close_listener(self._listeners.pop(key))
        return len(keys)

    async def _close_listener(self, lst: _Listener) -> None:
        if lst.server is not None:
            lst.server.close()
            lst.server = None
            BUDGET.release(self._sb.sandbox_id, 1)
        tasks = list(lst.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def _linger(self, st: HostStream) -> None:
        """After a graceful close: wait (bounded) for the guest's side to close too;
        data arriving meanwhile resets the connection, as a closed socket would."""
        async def run() -> None:
            try:
                async with asyncio.timeout(LINGER):
                    while True:
                        item = await st.next(None)
                        if item.kind in ("reply", "error"):
                            return
                        if item.kind == "data":
                            break
            except TimeoutError:
                pass
            finally:
                await st.reset()

        if self._ended:
            task = asyncio.get_running_loop().create_task(st.reset())
        else:
            task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(_retrieve)
        self._track(task)

    async def _shutdown(self) -> None:
        # see shutdown_ports
        self._ended = True
        listeners = list(self._listeners.values())
        self._listeners.clear()
        for lst in listeners:
            with contextlib.suppress(Exception):
                await self._close_listener(lst)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


async def shutdown_ports(ports: AsyncPorts) -> None:
    """Close every listener and tunnel of ``ports`` for good, as its sandbox ends (kill)
    or is detached (for the sandbox; not on the user's ``sandbox.ports``). Any state;
    never raises."""
    await ports._shutdown()


class Ports:
    """Sync twin of AsyncPorts (``sandbox.ports``)."""

    def __init__(self, inner: AsyncPorts) -> None:
        self._a = inner

    def expose(self, port: int, *, host: str = DEFAULT_BIND, host_port: int = 0,
               guest_host: str = GUEST_LOOPBACK) -> ExposedPort:
        """See AsyncPorts.expose."""
        return _portal.call(self._a.expose(port, host=host, host_port=host_port,
                                           guest_host=guest_host))

    def wait(self, port: int, *, timeout: float = DEFAULT_WAIT,
             guest_host: str = GUEST_LOOPBACK) -> None:
        """See AsyncPorts.wait."""
        _portal.call(self._a.wait(port, timeout=timeout, guest_host=guest_host))

    def connect(self, port: int, *, timeout: float | None = None,
                guest_host: str = GUEST_LOOPBACK) -> PortStream:
        """See AsyncPorts.connect; returns a socket-like PortStream."""
        return PortStream(_portal.call(self._a.connect(port, timeout=timeout,
                                                       guest_host=guest_host)))

    def list(self) -> list[ExposedPort]:
        return _portal.call(self._a.list())

    def close(self, port: int | ExposedPort) -> int:
        """See AsyncPorts.close."""
        return _portal.call(self._a.close(port))
