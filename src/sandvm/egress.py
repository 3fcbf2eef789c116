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

A refused request gets ``403`` (``502``/``504`` for upstream failures) with the
reason in an ``X-Sandvm-Reason`` header and in the body, so ``curl -v`` or Python's
error message in the guest says why.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import ipaddress
import json
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sandvm.errors import InvalidSpec
from sandvm.fds import BUDGET, FdBudget

Resolver = Callable[[str, int], Awaitable[list[str]]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HEAD = 16 * 1024  # a request line + headers
HEAD_TIMEOUT = 10.0  # to send them
CHUNK = 64 * 1024
MAX_EVENTS = 1000  # kept in memory per proxy
MAX_REASON = 300  # characters of a reason kept (a guest's host name can be long)
MAX_AUDIT_BYTES = 1 << 20  # of a sandbox's audit file, over its life (then "dropped")
COALESCE_WINDOW = 10.0  # seconds: identical refusals within it become one record + a count
MAX_BURSTS = 64  # distinct refusals coalesced at once
KEEP_ENDED = 64  # audit files of ended sandboxes kept (in audit/ended/, oldest removed)
MAX_LOOKUPS = 4  # getaddrinfo threads of one sandbox (lookups at once)
LOOPBACK_ONLY_ENV = "SANDVM_EGRESS_LOOPBACK_ONLY"  # test suites: see open_upstream
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in values
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive",
                "te", "trailer", "upgrade"}


# --------------------------------------------------------------------------- policy


def _ip_literal(host: str) -> bool:
    """An IP address in any spelling a resolver takes (``127.1``, ``2130706433``,
    ``0x7f.1``): no top-level domain is numeric, so a numeric last label means one."""
    h = host.strip("[]").rstrip(".")
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        pass
    last = h.rsplit(".", 1)[-1].lower()
    return bool(last) and (last.isdigit() or (last.startswith("0x") and
                                             all(c in "0123456789abcdef" for c in last[2:])))


def normalize_host(host: str) -> str:
    """A host name in the form the policy compares: lower case, IDNA (punycode), no
    trailing dot. Raises InvalidSpec for an IP literal or a malformed name."""
    if not isinstance(host, str) or not host:
        raise InvalidSpec(f"host names must be non-empty strings, got {host!r}")
    h = host.strip().rstrip(".").lower()
    if _ip_literal(h):
        raise InvalidSpec(f"{host!r} is an IP address: IP literals are refused, name the host")
    try:
        h = h.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidSpec(f"{host!r} is not a valid host name") from None
    labels = h.split(".")
    if len(h) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InvalidSpec(f"{host!r} is not a valid host name")
    return h


def _normalize_pattern(pattern: str) -> str:
    if not isinstance(pattern, str):
        raise InvalidSpec(f"allowed hosts must be strings, got {pattern!r}")
    p = pattern.strip().lower()
    if p.startswith("*."):
        rest = normalize_host(p[2:])
        if "." not in rest:
            raise InvalidSpec(f"{pattern!r} is too broad: a wildcard needs a domain with a"
                              " dot under it, e.g. *.example.org")
        return "*." + rest
    if "*" in p:
        raise InvalidSpec(f"{pattern!r}: a wildcard may only be a leading '*.',"
                          " e.g. *.example.org")
    return normalize_host(p)


def _normalize_hosts(hosts: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    items = hosts.items() if isinstance(hosts, dict) else hosts
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InvalidSpec(f"NetworkPolicy.hosts must map names to addresses, got {hosts!r}")
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidSpec(f"NetworkPolicy.hosts: {item!r} is not a (name, address) pair")
        name, addrs = item
        addr_list = [addrs] if isinstance(addrs, str) else list(addrs)
        checked = []
        for a in addr_list:
            try:
                checked.append(str(ipaddress.ip_address(a)))
            except (ValueError, TypeError):
                raise InvalidSpec(f"NetworkPolicy.hosts: {a!r} (for {name!r}) is not an IP"
                                  " address") from None
        if not checked:
            raise InvalidSpec(f"NetworkPolicy.hosts: no address for {name!r}")
        out[normalize_host(name)] = tuple(checked)
    return tuple(out.items())


def _port(p: Any) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
        raise InvalidSpec(f"ports must be integers from 1 to 65535, got {p!r}")
    return p


@dataclass(frozen=True)
class NetworkPolicy:
    """What one sandbox may reach. The default allows nothing.

    ``allow``: host names and ``*.`` wildcards. ``ports``: destination ports (443).
    ``allow_http``: plain HTTP requests too (their ports must be listed, e.g. 80).
    ``allow_ips``: CIDRs of non-global addresses (private, loopback, ...) that may be
    reached anyway. ``connect_timeout``/``idle_timeout``: seconds. ``max_bytes``: bytes
    through the proxy, both ways, over the sandbox's life (None: no cap).
    ``max_connections``: open at once. ``hosts``: fixed answers used instead of DNS,
    like /etc/hosts (``{"db.internal": "10.0.0.5"}``, or pairs); their addresses are
    checked like resolved ones. Raises InvalidSpec for anything malformed.
    """

    allow: tuple[str, ...] = ()
    ports: tuple[int, ...] = (443,)
    allow_http: bool = False
    allow_ips: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    idle_timeout: float = 120.0
    max_bytes: int | None = None
    max_connections: int = 64
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        for name in ("allow", "ports", "allow_ips"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise InvalidSpec(f"NetworkPolicy.{name} must be a list, got {value!r}")
        allow = tuple(dict.fromkeys(_normalize_pattern(p) for p in self.allow))
        ports = tuple(sorted({_port(p) for p in self.ports}))
        nets = []
        for cidr in self.allow_ips:
            try:
                nets.append(str(ipaddress.ip_network(cidr, strict=False)))
            except (ValueError, TypeError):
                raise InvalidSpec(f"allow_ips: {cidr!r} is not an address or CIDR,"
                                  " e.g. 10.0.0.0/8") from None
        for name in ("connect_timeout", "idle_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 86400:
                raise InvalidSpec(f"NetworkPolicy.{name} must be seconds in (0, 86400],"
                                  f" got {v!r}")
        mb = self.max_bytes
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 0):
            raise InvalidSpec(f"NetworkPolicy.max_bytes must be a byte count or None, got {mb!r}")
        mc = self.max_connections
        if isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= 10_000:
            raise InvalidSpec(f"NetworkPolicy.max_connections must be 1..10000, got {mc!r}")
        if not isinstance(self.allow_http, bool):
            raise InvalidSpec(f"NetworkPolicy.allow_http must be a bool, got {self.allow_http!r}")
        object.__setattr__(self, "hosts", _normalize_hosts(self.hosts))
        object.__setattr__(self, "allow", allow)
        object.__setattr__(self, "ports", ports)
        object.__setattr__(self, "allow_ips", tuple(dict.fromkeys(nets)))

    def pinned(self, host: str) -> list[str] | None:
        """The fixed addresses of ``host`` (from ``hosts``), or None to resolve it."""
        for name, addrs in self.hosts:
            if name == host:
                return list(addrs)
        return None

    @property
    def _networks(self) -> list[IpNetwork]:
        return [ipaddress.ip_network(n) for n in self.allow_ips]

    def check_host(self, host: str, port: int, *, scheme: str = "https") -> str | None:
        """Why ``host:port`` is refused (None: allowed by name and port)."""
        if scheme == "http" and not self.allow_http:
            return "plain HTTP is not allowed by this sandbox's policy (use HTTPS)"
        try:
            h = normalize_host(host)
        except InvalidSpec as exc:
            return exc.message
        if port not in self.ports:
            allowed = ", ".join(map(str, self.ports)) or "none"
            return f"port {port} is not allowed (allowed: {allowed})"
        for p in self.allow:
            if h == p or (p.startswith("*.") and h.endswith(p[1:])):
                return None
        return f"{h} is not on this sandbox's allow list"

    def check_address(self, address: str) -> str | None:
        """Why connecting to ``address`` is refused (None: allowed)."""
        ip: IpAddress = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self._networks):
            return None
        inner = _embedded_ipv4(ip)
        if ip.is_global and not ip.is_multicast and all(
                v4.is_global and not v4.is_multicast for v4 in inner):
            return None
        if inner and ip.is_global:
            return (f"{address} carries the non-public IPv4 address {inner[0]}"
                    " (6to4, Teredo, NAT64 or IPv4-compatible); allow it explicitly"
                    " with allow_ips")
        kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local
                else "private" if ip.is_private else "non-public")
        extra = " (cloud metadata)" if str(ip) in ("169.254.169.254", "fd00:ec2::254") else ""
        return f"{address} is a {kind} address{extra}; allow it explicitly with allow_ips"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _embedded_ipv4(ip: IpAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 one carries: 6to4, Teredo, NAT64, IPv4-compatible."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out = []
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    n = int(ip)
    if ip in _NAT64 or ip in _NAT64_LOCAL or (n >> 32 == 0 and n > 0xFFFF):
        out.append(ipaddress.IPv4Address(n & 0xFFFFFFFF))
    return out


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class EgressEvent:
    """One decision or outcome of the egress proxy, for the audit log.

    ``action``: ``allow`` (a connection was made), ``deny`` (refused by the policy),
    ``error`` (allowed but failed: resolution, connect, timeout) or ``close`` (a
    connection ended; with its byte counts). ``count``: how many identical decisions
    the record stands for (repeated refusals are coalesced: the first is recorded at
    once, the repeats of the next COALESCE_WINDOW seconds as one record with their
    count and the time of the last)."""

    ts: float
    sandbox_id: str
    action: str
    method: str
    host: str
    port: int
    reason: str
    address: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    count: int = 1


@dataclass
class _Burst:
    since: float  # monotonic time of the first
    last: EgressEvent
    repeats: int = 0


class AuditLog:
    """Events of one proxy: the last MAX_EVENTS in memory, subscribers, a JSONL file.

    Subscribers get every event. Memory and the file get repeated refusals (``deny`` and
    ``error`` with the same method, host, port, address and reason) coalesced: the
    first at once, the repeats as one record with a ``count`` once COALESCE_WINDOW
    seconds have passed (or at ``close``). The file holds at most ``max_bytes`` (counted
    over the sandbox's life, across holders): what does not fit is counted and, at
    ``close``, summed up in one ``dropped`` record. ``end`` (the sandbox ended) moves
    the file to ``ended/`` beside it, where the last KEEP_ENDED are kept."""

    def __init__(self, path: Path | None = None, *, max_bytes: int = MAX_AUDIT_BYTES,
                 window: float = COALESCE_WINDOW) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.window = window
        self._events: collections.deque[EgressEvent] = collections.deque(maxlen=MAX_EVENTS)
        self._subscribers: list[Callable[[EgressEvent], None]] = []
        self._bursts: dict[tuple[Any, ...], _Burst] = {}
        self.write_errors = 0  # events the file did not get (I/O errors)
        self.dropped = 0  # events the file did not get (its byte cap), not yet reported
        self._size = 0
        self._sandbox_id = "-"
        if path is not None:  # there from the start (mode 0600), even before any event
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                self._size = os.fstat(fd).st_size  # an earlier holder's records count
            finally:
                os.close(fd)

    def record(self, event: EgressEvent) -> None:
        """Keep ``event`` (coalesced with its repeats) and hand it to every subscriber."""
        self._sandbox_id = event.sandbox_id
        now = time.monotonic()
        self._flush(now)
        for fn in list(self._subscribers):
            with contextlib.suppress(Exception):  # an observer's bug never breaks egress
                fn(event)
        if event.action in ("deny", "error"):
            key = (event.action, event.method, event.host, event.port, event.address,
                   event.reason)
            burst = self._bursts.get(key)
            if burst is not None:
                burst.repeats += 1
                burst.last = event
                return
            if len(self._bursts) >= MAX_BURSTS:  # the oldest one is written now
                oldest = min(self._bursts, key=lambda k: self._bursts[k].since)
                self._emit_repeats(self._bursts.pop(oldest))
            self._bursts[key] = _Burst(now, event)
        self._keep(event)

    def _flush(self, now: float | None = None) -> None:
        """Write the repeat records of bursts older than the window (all: ``now`` None)."""
        for key, burst in list(self._bursts.items()):
            if now is None or now - burst.since >= self.window:
                del self._bursts[key]
                self._emit_repeats(burst)

    def _emit_repeats(self, burst: _Burst) -> None:
        if burst.repeats:
            self._keep(dataclasses.replace(burst.last, count=burst.repeats))

    def _keep(self, event: EgressEvent) -> None:
        self._events.append(event)
        self._write(json.dumps(asdict(event)) + "\n")

    def _write(self, line: str, *, reserve: int = 1024) -> bool:
        """Append ``line`` if it fits under the cap (less ``reserve`` bytes kept for the
        ``dropped`` record); False if not written."""
        if self.path is None:
            return False
        data = line.encode()
        if self._size + len(data) > self.max_bytes - reserve:
            self.dropped += 1
            return False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError:  # e.g. a full disk: counted, and the event is still kept here
            self.write_errors += 1
            return False
        self._size += len(data)
        return True

    def close(self) -> None:
        """Write what is pending: coalesced repeats, and a ``dropped`` record if the cap
        cut events off. The log stays usable (a later event is recorded as usual)."""
        self._flush(None)
        if self.dropped and self.path is not None:
            n = self.dropped
            rec = EgressEvent(ts=time.time(), sandbox_id=self._sandbox_id, action="dropped",
                              method="-", host="-", port=0, count=n,
                              reason=f"the audit file reached its cap of {self.max_bytes}"
                                     f" bytes: {n} events were not written to it")
            if self._write(json.dumps(asdict(rec)) + "\n", reserve=0):
                self.dropped = 0

    def end(self) -> Path | None:
        """The sandbox ended: ``close``, then move the file to ``ended/`` beside it
        (keeping the newest KEEP_ENDED there); returns its new path (None: no file).
        Never raises."""
        self.close()
        path, self.path = self.path, None
        if path is None or not path.exists():
            return None
        ended = path.parent / "ended"
        try:
            ended.mkdir(exist_ok=True, mode=0o700)
            target = ended / path.name
            os.replace(path, target)
            kept = sorted(ended.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in kept[KEEP_ENDED:]:
                with contextlib.suppress(OSError):
                    old.unlink()
            return target
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def subscribe(self, fn: Callable[[EgressEvent], None]) -> Callable[[], None]:
        """Call ``fn`` with every event from now on; returns what unsubscribes it."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def events(self) -> list[EgressEvent]:
        """The kept events, oldest first (repeats whose window passed included)."""
        self._flush(time.monotonic())
        return list(self._events)

    def __iter__(self) -> Iterator[EgressEvent]:
        return iter(self.events())


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
    if _ip_literal(host):
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
