"""What a sandbox may reach, and the record of what it tried: the egress proxy's rules
(``NetworkPolicy``: host names and wildcards, ports, which addresses count as public)
and its audit trail (``EgressEvent``, ``AuditLog``), apart from the proxy itself
(``sandvm.egress``, which also exports these names).

Values only, no network: the remote SDK uses ``NetworkPolicy`` and ``EgressEvent``
without loading the proxy.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sandvm.errors import InvalidSpec

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_EVENTS = 1000  # kept in memory per proxy
MAX_AUDIT_BYTES = 1 << 20  # of a sandbox's audit file, over its life (then "dropped")
COALESCE_WINDOW = 10.0  # seconds: identical refusals within it become one record + a count
MAX_BURSTS = 64  # distinct refusals coalesced at once
KEEP_ENDED = 64  # audit files of ended sandboxes kept (in audit/ended/, oldest removed)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

# --------------------------------------------------------------------------- policy


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IP address in any spelling a resolver takes (``127.1``,
    ``2130706433``, ``0x7f.1``): no top-level domain is numeric, so a numeric last label
    means one."""
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
    if is_ip_literal(h):
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
