"""The host-side egress proxy: what a sandbox may reach on the network, and how.

sandvm VMs have no network device. A workload's HTTP(S) traffic goes to a proxy
listener inside the guest (``HTTP_PROXY``/``HTTPS_PROXY`` point at it), over the agent
channel, to an :class:`EgressProxy` on the host, which applies the sandbox's
:class:`NetworkPolicy` and makes the connection itself:

- deny by default; allowed hosts are exact names or ``*.`` wildcards (``*.example.org``
  matches ``a.example.org`` and ``a.b.example.org``, not ``example.org``);
- IP literals are refused, in the policy and in requests: name the host;
- the proxy resolves the name itself and connects to an address it checked (a DNS
  answer cannot rebind the connection elsewhere); addresses that are not global
  (private, loopback, link-local, cloud metadata, CGNAT, ...) are refused unless a
  CIDR in ``allow_ips`` names them;
- allowed ports (443 only, by default); HTTPS through ``CONNECT``; plain HTTP
  (absolute-form requests) only with ``allow_http``;
- connect and idle timeouts, a byte cap for the whole sandbox, a connection cap (a
  connection counts from its first byte: one still sending its request head too);
- names are resolved in threads of the sandbox's own (a name whose DNS never answers
  stalls only that sandbox's lookups); ``localhost`` and ``.invalid`` names (RFC 6761)
  never reach the resolver;
- upstream connections take descriptors from the process's budget (:mod:`sandvm.fds`):
  what does not fit is refused (503) before the process runs out;
- every decision is an :class:`EgressEvent` with its reason: kept in memory, handed to
  subscribers, and appended to a JSON-lines audit file when one is given (repeats
  coalesced into one record with a count, the file capped in bytes, moved aside when
  the sandbox ends);
- ``set_policy`` replaces the policy atomically: new requests see the new one at
  once, and open tunnels the new one refuses are closed.

The rules themselves (``NetworkPolicy``) and the audit trail (``EgressEvent``,
``AuditLog``) live in :mod:`sandvm.egress_policy`; this module re-exports them.

A refused request gets ``403`` (``502``/``504`` for upstream failures) with the
reason in an ``X-Sandvm-Reason`` header and in the body, so ``curl -v`` or Python's
error message in the guest says why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import ipaddress
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sandvm.egress_policy import (
    AuditLog,
    EgressEvent,
    NetworkPolicy,
    is_ip_literal,
    normalize_host,
)
from sandvm.errors import InvalidSpec
from sandvm.fds import BUDGET, FdBudget

__all__ = [  # NetworkPolicy, EgressEvent and AuditLog live in sandvm.egress_policy
    "CHUNK",
    "HEAD_TIMEOUT",
    "LOOPBACK_ONLY_ENV",
    "MAX_HEAD",
    "MAX_LOOKUPS",
    "MAX_REASON",
    "AuditLog",
    "EgressEvent",
    "EgressProxy",
    "NetworkPolicy",
    "Resolver",
    "SystemResolver",
    "error_response",
    "normalize_host",
    "open_upstream",
    "proxy_env",
    "system_resolver",
]

Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_HEAD = 16 * 1024  # a request line + headers
HEAD_TIMEOUT = 10.0  # to send them
CHUNK = 64 * 1024
MAX_REASON = 300  # characters of a reason kept (a guest's host name can be long)
MAX_LOOKUPS = 4  # getaddrinfo threads of one sandbox (lookups at once)
LOOPBACK_ONLY_ENV = "SANDVM_EGRESS_LOOPBACK_ONLY"  # test suites: see open_upstream
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in values
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive",
                "te", "trailer", "upgrade"}


# --------------------------------------------------------------------------- proxy


_REAL_GETADDRINFO = socket.getaddrinfo


def _guard_violation(what: str) -> None:
    """Under LOOPBACK_ONLY_ENV (a file path): note an attempt to leave the machine."""
    path = os.environ.get(LOOPBACK_ONLY_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "a") as f:
            f.write(what.replace("\n", " ")[:500] + "\n")


class SystemResolver:
    """The host's own resolver (getaddrinfo) for one sandbox: addresses in its order, no
    duplicates. getaddrinfo cannot be cancelled, so a lookup that never answers keeps
    its thread after the proxy gave up on it; each sandbox's proxy has its own pool of
    ``workers`` threads, so such names stall only that sandbox's lookups, never another
    sandbox's (nor the default executor the rest of sandvm uses)."""

    def __init__(self, *, workers: int = MAX_LOOKUPS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="sandvm-dns")

    async def __call__(self, host: str, port: int) -> list[str]:
        lookup = socket.getaddrinfo  # read here: a test's resolver stub replaces it
        if lookup is _REAL_GETADDRINFO and host != "localhost" and \
                os.environ.get(LOOPBACK_ONLY_ENV):  # a lookup may leave the machine
            _guard_violation(f"system resolver asked for {host}")
            raise OSError(errno.EACCES, f"{LOOPBACK_ONLY_ENV} is set: no DNS lookups")
        infos = await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(lookup, host, port, type=socket.SOCK_STREAM))
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def close(self) -> None:
        """Lookups queued are dropped; running ones end on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


_SHARED_RESOLVER = SystemResolver(workers=8)


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's own resolver, for callers without a proxy (a proxy has its own)."""
    return await _SHARED_RESOLVER(host, port)


def _special_use(name: str) -> list[str] | None:
    """Answers for special-use names (RFC 6761) that never go to a resolver:
    ``localhost`` and ``*.localhost`` are loopback; ``*.invalid`` never resolves."""
    if name == "localhost" or name.endswith(".localhost"):
        return ["127.0.0.1", "::1"]
    if name == "invalid" or name.endswith(".invalid"):
        raise _Refused(502, f"cannot resolve {name}: .invalid names never resolve"
                            " (RFC 6761)")
    return None


async def open_upstream(address: str, port: int
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """How every proxy connects to an address it checked: a module-level hook, so a
    test suite can watch it. With ``$SANDVM_EGRESS_LOOPBACK_ONLY`` set to a file path
    (sandvm's own tests set it), connections to addresses that are not loopback (and
    system resolver lookups, but for ``localhost``) are refused and written to that
    file."""
    if os.environ.get(LOOPBACK_ONLY_ENV) and not ipaddress.ip_address(address).is_loopback:
        _guard_violation(f"egress connect to {address}:{port}")
        raise OSError(errno.EACCES, f"{LOOPBACK_ONLY_ENV} is set: only loopback addresses")
    return await asyncio.open_connection(address, port, limit=CHUNK)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(eq=False)
class _Tunnel:
    method: str
    host: str
    port: int
    address: str
    scheme: str
    writers: tuple[asyncio.StreamWriter, ...]
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    bytes_out: int = 0
    bytes_in: int = 0
    closed_reason: str | None = None

    def abort(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.transport.abort()


_STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
                429: "Too Many Requests", 431: "Request Header Fields Too Large",
                502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class EgressProxy:
    """The egress proxy of one sandbox. ``handle`` serves one client connection (a pair
    of asyncio streams: a TCP connection, or a stream over the agent channel)."""

    def __init__(self, policy: NetworkPolicy | None = None, *, sandbox_id: str = "-",
                 resolver: Resolver | None = None, audit: AuditLog | None = None,
                 budget: FdBudget | None = None) -> None:
        self._policy = policy or NetworkPolicy()
        self.sandbox_id = sandbox_id
        self._own_resolver = SystemResolver() if resolver is None else None
        self.resolver: Resolver = resolver or self._own_resolver  # type: ignore[assignment]
        self.audit = audit or AuditLog()
        self.budget = budget or BUDGET  # upstream connections' descriptors
        self._tunnels: set[_Tunnel] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._slots = 0  # requests past the checks: resolving, connecting or relaying
        self.bytes_total = 0
        self._closed = False

    @property
    def policy(self) -> NetworkPolicy:
        return self._policy

    @property
    def active(self) -> int:
        """Connections open through the proxy now."""
        return len(self._tunnels)

    def room(self) -> str | None:
        """Why a new client connection would be refused at once (None: there is room):
        the network is closed, or ``max_connections`` are taken (connections count from
        their first byte, so silent ones count too)."""
        if self._closed:
            return "the sandbox's network is closed"
        cap = self._policy.max_connections
        if self._slots >= cap:
            return f"too many connections open ({cap})"
        return None

    def refuse(self, status: int, reason: str) -> bytes:
        """Record a refusal made before the request was read (the caller answers with
        the bytes returned: an HTTP error response)."""
        self._event("deny" if status in (403, 429) else "error", "?", "?", 0, reason)
        return error_response(status, reason)

    def set_policy(self, policy: NetworkPolicy) -> None:
        """Replace the policy, atomically: requests from now on see only the new one,
        and open connections it refuses are closed (audited as ``close``)."""
        if not isinstance(policy, NetworkPolicy):
            raise InvalidSpec(f"expected a NetworkPolicy, got {type(policy).__name__}")
        self._policy = policy
        for t in list(self._tunnels):
            why = policy.check_host(t.host, t.port, scheme=t.scheme) or \
                policy.check_address(t.address)
            if why is not None:
                t.abort(f"the policy changed: {why}")

    async def aclose(self) -> None:
        """Close every connection and wait for their last events; later requests are
        refused."""
        self._closed = True
        for t in list(self._tunnels):
            t.abort("the sandbox's network was closed")
        for w in list(self._clients):
            with contextlib.suppress(Exception):
                w.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5.0)
        if self._own_resolver is not None:
            self._own_resolver.close()
        self.audit.close()

    def _event(self, action: str, method: str, host: str, port: int, reason: str,
               **extra: Any) -> None:
        self.audit.record(EgressEvent(ts=time.time(), sandbox_id=self.sandbox_id,
                                      action=action, method=method[:16], host=host[:255],
                                      port=port, reason=reason[:MAX_REASON], **extra))

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """Serve on a TCP listener (tests, benchmarks, or a host-side proxy)."""
        return await asyncio.start_server(self.handle, host, port)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     upstream_reserved: bool = False) -> None:
        """Serve one client connection: one CONNECT tunnel or one plain HTTP request.
        ``upstream_reserved``: the caller took the upstream connection's descriptor from
        the budget already (a sandbox's bridge does, with its own)."""
        why = self.room()
        if why is not None:  # before reading anything: a silent client holds a slot too
            status = 403 if self._closed else 429
            with contextlib.suppress(Exception):
                writer.write(self.refuse(status, why))
                await asyncio.wait_for(writer.drain(), 5.0)
            with contextlib.suppress(Exception):
                writer.close()
            return
        self._slots += 1  # held from the first byte until the connection ends
        self._clients.add(writer)
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        method, host, port = "?", "?", 0
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.LimitOverrunError:
                raise _Refused(431, f"request head larger than {MAX_HEAD} bytes") from None
            except (asyncio.IncompleteReadError, TimeoutError):
                return  # nothing to answer: the client left or never spoke
            if len(head) > MAX_HEAD:
                raise _Refused(431, f"request head larger than {MAX_HEAD} bytes")
            method, target, version, headers = _parse_head(head)
            if method == "CONNECT":
                host, port = _split_authority(target, default_port=443)
                scheme = "https"
            else:
                scheme, host, port, path = _split_absolute(target)
            await self._serve(reader, writer, method=method, scheme=scheme, host=host,
                              port=port, version=version, headers=headers,
                              path=None if method == "CONNECT" else path,
                              reserved=upstream_reserved)
        except _Refused as r:
            action = "deny" if r.status in (403, 429) else "error"
            if r.status in (400, 405, 431):
                action = "deny"
            self._event(action, method, host, port, r.reason)
            await _reply_error(writer, r.status, r.reason)
        except (ConnectionError, OSError):
            pass
        finally:
            self._slots -= 1
            self._clients.discard(writer)
            if me is not None:
                self._handlers.discard(me)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     method: str, scheme: str, host: str, port: int, version: str,
                     headers: list[tuple[str, str]], path: str | None,
                     reserved: bool) -> None:
        policy = self._policy  # one policy for the whole decision
        if self._closed:
            raise _Refused(403, "the sandbox's network is closed")
        why = policy.check_host(host, port, scheme=scheme)
        if why is not None:
            raise _Refused(403, why)
        if policy.max_bytes is not None and self.bytes_total >= policy.max_bytes:
            raise _Refused(403, f"the sandbox's egress byte cap ({policy.max_bytes} bytes)"
                                " is used up")
        if self._slots > policy.max_connections:  # the cap was lowered meanwhile
            raise _Refused(429, f"too many connections open ({policy.max_connections})")
        await self._connect_and_pipe(reader, writer, method=method, scheme=scheme,
                                     host=host, port=port, version=version,
                                     headers=headers, path=path, policy=policy,
                                     reserved=reserved)

    async def _connect_and_pipe(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter, *, method: str, scheme: str,
                                host: str, port: int, version: str,
                                headers: list[tuple[str, str]], path: str | None,
                                policy: NetworkPolicy, reserved: bool) -> None:
        name = normalize_host(host)
        addresses = policy.pinned(name)
        if addresses is None:
            addresses = _special_use(name)
        try:
            if addresses is None:
                addresses = await asyncio.wait_for(self.resolver(name, port),
                                                   policy.connect_timeout)
        except TimeoutError:
            raise _Refused(504, f"resolving {name} timed out") from None
        except (OSError, UnicodeError) as exc:
            raise _Refused(502, f"cannot resolve {name}: {exc}") from None
        refusals = []
        allowed = []
        for a in addresses:
            why = policy.check_address(a)
            if why is None:
                allowed.append(a)
            else:
                refusals.append(why)
        if not allowed:
            raise _Refused(403, f"{name} resolves only to refused addresses: "
                                f"{refusals[0] if refusals else 'none'}")
        why = None if reserved else self.budget.acquire(self.sandbox_id, 1)
        if why is not None:
            raise _Refused(503, why)
        try:
            await self._connect_checked(reader, writer, method=method, scheme=scheme,
                                        name=name, port=port, version=version,
                                        headers=headers, path=path, policy=policy,
                                        allowed=allowed)
        finally:
            if not reserved:
                self.budget.release(self.sandbox_id, 1)

    async def _connect_checked(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, *, method: str, scheme: str,
                               name: str, port: int, version: str,
                               headers: list[tuple[str, str]], path: str | None,
                               policy: NetworkPolicy, allowed: list[str]) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        address = allowed[0]
        deadline = time.monotonic() + policy.connect_timeout
        last_error = ""
        for address in allowed:  # the checked address itself: nothing re-resolves it
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                upstream = await asyncio.wait_for(open_upstream(address, port), left)
                break
            except TimeoutError:
                last_error = "timed out"
            except OSError as exc:
                last_error = os.strerror(exc.errno) if exc.errno else str(exc)
        if upstream is None:
            status = 504 if last_error in ("timed out", "") else 502
            raise _Refused(status, f"cannot connect to {name}:{port} ({address}):"
                                   f" {last_error or 'timed out'}")
        up_r, up_w = upstream
        # the policy may have changed, or the network closed, while we resolved and
        # connected: the decision stands only if the policy in force still allows it
        current = self._policy
        why = "the sandbox's network is closed" if self._closed else None
        if why is None and current is not policy:
            why = current.check_host(name, port, scheme=scheme) or \
                current.check_address(address)
        if why is not None:
            up_w.transport.abort()
            raise _Refused(403, f"the policy changed: {why}" if not self._closed else why)
        with contextlib.suppress(OSError):
            up_w.transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tun = _Tunnel(method=method, host=name, port=port, address=address, scheme=scheme,
                      writers=(writer, up_w))
        self._tunnels.add(tun)
        try:
            self._event("allow", method, name, port, "allowed by the policy", address=address)
            if method == "CONNECT":
                writer.write(f"{version} 200 Connection established\r\n\r\n".encode())
                await writer.drain()
            else:
                assert path is not None
                head = _origin_head(method, path, version, headers, name, port)
                tun.bytes_out += len(head)
                self.bytes_total += len(head)
                up_w.write(head)
            await self._pipe_both(tun, reader, writer, up_r, up_w, policy)
        finally:
            self._tunnels.discard(tun)
            with contextlib.suppress(Exception):
                up_w.close()
            self._event("close", method, name, port, tun.closed_reason or "closed",
                        address=address, bytes_out=tun.bytes_out, bytes_in=tun.bytes_in,
                        seconds=round(time.monotonic() - tun.started, 3))

    async def _pipe_both(self, tun: _Tunnel, c_r: asyncio.StreamReader,
                         c_w: asyncio.StreamWriter, u_r: asyncio.StreamReader,
                         u_w: asyncio.StreamWriter, policy: NetworkPolicy) -> None:
        async def watchdog() -> None:
            while True:
                idle = self._policy.idle_timeout
                await asyncio.sleep(min(1.0, idle / 4))
                if time.monotonic() - tun.last >= self._policy.idle_timeout:
                    tun.abort(f"idle for {self._policy.idle_timeout:g} s")
                    return

        dog = asyncio.get_running_loop().create_task(watchdog())
        try:
            await asyncio.gather(self._pipe(tun, c_r, u_w, outbound=True),
                                 self._pipe(tun, u_r, c_w, outbound=False,
                                            response_head=tun.method != "CONNECT"))
        finally:
            dog.cancel()

    async def _pipe(self, tun: _Tunnel, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    *, outbound: bool, response_head: bool = False) -> None:
        try:
            while True:
                if response_head:  # one request per connection: tell the client so
                    response_head = False
                    try:
                        data = _close_head(await src.readuntil(b"\r\n\r\n"))
                    except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                        tun.abort("the server sent a malformed response head")
                        return
                else:
                    data = await src.read(CHUNK)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()  # half-close: the other way may go on
                    return
                n = len(data)
                tun.last = time.monotonic()
                if outbound:
                    tun.bytes_out += n
                else:
                    tun.bytes_in += n
                self.bytes_total += n
                cap = self._policy.max_bytes
                if cap is not None and self.bytes_total > cap:
                    for t in list(self._tunnels):
                        t.abort(f"the sandbox's egress byte cap ({cap} bytes) was reached")
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, RuntimeError):
            if tun.closed_reason is None:
                tun.abort("reset")
            else:
                tun.abort(tun.closed_reason)


# --------------------------------------------------------------------------- HTTP bits


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes anything; kept for clarity
        raise _Refused(400, "request head is not text") from None
    if _CONTROL.search(text.replace("\r\n", "")):
        raise _Refused(400, "control characters in the request head")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "not an HTTP/1.x proxy request")
    method, target, version = parts
    if not method.isalpha() or not method.isupper():
        raise _Refused(400, f"bad method {method[:20]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise _Refused(400, "malformed header line")
        headers.append((name, value.strip()))
    return method, target, version, headers


def _split_authority(authority: str, *, default_port: int) -> tuple[str, int]:
    if authority.startswith("["):  # [v6]:port
        host, _, rest = authority[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if not host:
        raise _Refused(400, f"no host in {authority[:100]!r}")
    if is_ip_literal(host):
        raise _Refused(403, f"{host} is an IP address: IP literals are refused, name the host")
    if port_s and not (port_s.isascii() and port_s.isdigit() and len(port_s) <= 5):
        raise _Refused(400, f"bad port in {authority[:100]!r}")
    port = int(port_s) if port_s else default_port
    if not 1 <= port <= 65535:
        raise _Refused(400, f"bad port in {authority[:100]!r}")
    return host, port


def _split_absolute(target: str) -> tuple[str, str, int, str]:
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise _Refused(400, "a proxy request needs an absolute URL (http://host/path);"
                            " HTTPS goes through CONNECT")
    scheme = scheme.lower()
    if scheme != "http":
        raise _Refused(400, f"{scheme}:// is not proxied as a plain request; HTTPS goes"
                            " through CONNECT")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise _Refused(400, "credentials in the URL are refused")
    host, port = _split_authority(authority, default_port=80)
    return scheme, host, port, slash + path or "/"


def _origin_head(method: str, path: str, version: str, headers: list[tuple[str, str]],
                 host: str, port: int) -> bytes:
    out = [f"{method} {path} {version}",
           f"Host: {host}" + ("" if port == 80 else f":{port}")]  # the checked authority
    for name, value in headers:
        low = name.lower()
        if low in _HOP_HEADERS or low == "host":
            continue
        out.append(f"{name}: {value}")
    out.append("Connection: close")
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def _close_head(head: bytes) -> bytes:
    """A response head with its hop-by-hop headers replaced by ``Connection: close``."""
    lines = head.split(b"\r\n")
    kept = [ln for ln in lines[1:] if ln and
            ln.split(b":", 1)[0].strip().lower().decode("latin-1") not in _HOP_HEADERS]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def error_response(status: int, reason: str) -> bytes:
    """The proxy's HTTP error response: ``status``, the reason in the status line, an
    ``X-Sandvm-Reason`` header and the body."""
    reason_line = reason.replace("\r", " ").replace("\n", " ")[:500]
    body = f"sandvm egress: {reason_line}\n".encode()
    # the reason in the status line too: clients that show only it (Python's "Tunnel
    # connection failed: 403 ...", curl's -v) then say why
    phrase = f"{_STATUS_TEXT.get(status, 'Error')} by sandvm egress: {reason_line}"[:300]
    head = (f"HTTP/1.1 {status} {phrase}\r\n"
            f"X-Sandvm-Reason: {reason_line}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("utf-8", "replace") + body


async def _reply_error(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        writer.write(error_response(status, reason))
        await asyncio.wait_for(writer.drain(), 5.0)


def proxy_env(port: int, *, host: str = "127.0.0.1") -> dict[str, str]:
    """The environment that sends a workload's HTTP(S) through the proxy at host:port."""
    url = f"http://{host}:{port}"
    no_proxy = "localhost,127.0.0.1,::1"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy}
