"""The remote SDK's ``sandbox.ports`` and ``sandbox.network`` (twins of the local ones).

    url = sb.ports.expose(8000)          # an ExposedPort: the URL, on the server's host
    sb.ports.wait(8000, timeout=30)      # until a server in the guest listens
    sb.ports.list(); sb.ports.close(8000)
    sb.network.set_policy(NetworkPolicy(allow=["pypi.org"]))
    sb.network.policy                    # (sync) fetched from the server
    sb.network.events()                  # the egress proxy's latest decisions

Exposed ports listen on the server's host (127.0.0.1 unless its operator chose another
address with ``sandvm serve --port-host``; the server picks the host port), so the URL
works where the server's host is reachable. There is no ``ports.connect`` over HTTP:
expose the port and connect to its URL.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from sandvm import _portal
from sandvm.client._http import policy_body
from sandvm.egress_policy import EgressEvent, NetworkPolicy
from sandvm.errors import InvalidSpec, PortTimeout, ServiceError
from sandvm.portspec import DEFAULT_WAIT, ExposedPort, check_port

if TYPE_CHECKING:
    from sandvm.client._http import SandboxCalls

__all__ = ["AsyncNetwork", "AsyncPorts", "Network", "NetworkInfo", "Ports"]

MAX_WAIT_STEP = 60.0  # the server's cap on one wait request; longer waits take several


def _exposed(d: object) -> ExposedPort:
    try:
        assert isinstance(d, dict)
        return ExposedPort(str(d["host"]), int(d["host_port"]), int(d["port"]))
    except (AssertionError, KeyError, TypeError, ValueError):
        raise ServiceError("the server sent a malformed port description") from None


def _policy(d: object) -> NetworkPolicy | None:
    if d is None:
        return None
    try:
        assert isinstance(d, dict)
        mb = d.get("max_bytes")
        return NetworkPolicy(allow=tuple(d["allow"]), ports=tuple(d["ports"]),
                             allow_http=bool(d["allow_http"]),
                             max_bytes=None if mb is None else int(mb))
    except (AssertionError, KeyError, TypeError, ValueError, InvalidSpec):
        raise ServiceError("the server sent a malformed network policy") from None


@dataclass(frozen=True)
class NetworkInfo:
    """A remote sandbox's egress: its policy (None: no egress), the bytes through its
    proxy over its life, and the connections open now."""

    enabled: bool
    policy: NetworkPolicy | None
    bytes_total: int
    connections: int

    @classmethod
    def from_json(cls, d: object) -> NetworkInfo:
        try:
            assert isinstance(d, dict)
            return cls(enabled=bool(d["enabled"]), policy=_policy(d.get("policy")),
                       bytes_total=int(d["bytes_total"]), connections=int(d["connections"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise ServiceError("the server sent a malformed network description") from None


class AsyncPorts:
    """``sandbox.ports`` of a remote sandbox: guest TCP servers reachable on the server's
    host. Allowed while the sandbox runs."""

    def __init__(self, sb: SandboxCalls) -> None:
        self._sb = sb

    def _path(self, suffix: str = "") -> str:
        return self._sb.path(f"/ports{suffix}")

    async def expose(self, port: int) -> ExposedPort:
        """Have the server listen for guest ``port`` (a free host port on its
        ``--port-host``, 127.0.0.1 by default) and return the listener's URL (an
        ExposedPort: a ``str`` with ``host``, ``port``, ``guest_port``). Exposing a
        port again returns the same listener. It ends with the sandbox or ``close``;
        a server restart re-opens it. Raises QuotaExceeded (the tenant's exposed
        ports), InvalidSpec, PortError, SandboxStateError, VmNotFound."""
        self._sb.check_open()
        port = check_port(port)
        return _exposed(await self._sb.api.call("POST", self._path(), json={"port": port}))

    async def list(self) -> builtins.list[ExposedPort]:
        """The sandbox's exposed ports, by guest port."""
        self._sb.check_open()
        res = await self._sb.api.call("GET", self._path())
        items = res.get("ports") if isinstance(res, dict) else None
        if not isinstance(items, builtins.list):
            raise ServiceError("the server sent a malformed port list")
        return [_exposed(i) for i in items]

    async def close(self, port: int | ExposedPort) -> int:
        """Stop exposing a guest port (an ExposedPort: its guest port); its open
        connections are reset. Returns how many listeners were closed (0 if it was
        not exposed). Raises InvalidSpec for a port outside 1..65535."""
        self._sb.check_open()
        guest = port.guest_port if isinstance(port, ExposedPort) else check_port(port)
        res = await self._sb.api.call("DELETE", self._path(f"/{guest}"))
        closed = res.get("closed") if isinstance(res, dict) else None
        if not isinstance(closed, int):
            raise ServiceError("the server sent a malformed answer to closing a port")
        return closed

    async def wait(self, port: int, *, timeout: float = DEFAULT_WAIT) -> None:
        """Return once a server in the guest listens on ``port`` (on 127.0.0.1, 0.0.0.0
        or ::). Raises PortTimeout after ``timeout`` seconds, InvalidSpec,
        SandboxStateError."""
        self._sb.check_open()
        port = check_port(port)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not timeout > 0:
            raise InvalidSpec(f"timeout must be positive seconds, not {timeout!r}")
        left = float(timeout)
        while True:
            step = min(left, MAX_WAIT_STEP)
            try:
                await self._sb.api.call(
                    "POST", self._path(f"/{port}/wait"), json={"timeout": step},
                    timeout=httpx.Timeout(60.0, connect=10.0, read=step + 30.0))
                return
            except PortTimeout:
                left -= step
                if left <= 0:
                    raise PortTimeout(f"nothing listens on guest port {port} after {timeout}"
                                      " s: is the server running, and bound to 127.0.0.1"
                                      " or 0.0.0.0?") from None


class AsyncNetwork:
    """``sandbox.network`` of a remote sandbox: its egress policy and audit events."""

    def __init__(self, sb: SandboxCalls) -> None:
        self._sb = sb

    async def info(self) -> NetworkInfo:
        """The policy in force, the bytes through the proxy, the open connections."""
        self._sb.check_open()
        return NetworkInfo.from_json(await self._sb.api.call("GET",
                                                              self._sb.path("/network")))

    async def get_policy(self) -> NetworkPolicy | None:
        """The policy in force (None: no egress at all)."""
        return (await self.info()).policy

    async def set_policy(self, policy: NetworkPolicy) -> None:
        """Replace the policy, atomically (open connections it refuses are closed); on a
        sandbox created without one, this starts its egress (commands started from then
        on get the proxy variables). A client sets ``allow``, ``ports``,
        ``allow_http`` and ``max_bytes``; other fields are the server operator's.
        Raises InvalidSpec, SandboxStateError, VmNotFound."""
        self._sb.check_open()
        if not isinstance(policy, NetworkPolicy):
            raise InvalidSpec(f"expected a NetworkPolicy, got {type(policy).__name__}")
        await self._sb.api.call("PUT", self._sb.path("/network"), json=policy_body(policy))

    async def events(self, *, limit: int = 100) -> builtins.list[EgressEvent]:
        """The egress proxy's latest ``limit`` (1..1000) decisions and connection ends,
        oldest first (none without egress)."""
        self._sb.check_open()
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidSpec(f"limit must be an int in 1..1000, not {limit!r}")
        res = await self._sb.api.call("GET", self._sb.path("/network/events"),
                                       params={"limit": limit})
        items = res.get("events") if isinstance(res, dict) else None
        if not isinstance(items, builtins.list):
            raise ServiceError("the server sent a malformed event list")
        return [_event(self._sb.sandbox_id, i) for i in items]


def _event(sandbox_id: str, d: Any) -> EgressEvent:
    try:
        assert isinstance(d, dict)
        addr = d.get("address")
        return EgressEvent(ts=float(d["ts"]), sandbox_id=sandbox_id, action=str(d["action"]),
                           method=str(d["method"]), host=str(d["host"]), port=int(d["port"]),
                           reason=str(d["reason"]), address=None if addr is None else str(addr),
                           bytes_out=int(d["bytes_out"]), bytes_in=int(d["bytes_in"]),
                           seconds=float(d["seconds"]), count=int(d.get("count", 1)))
    except (AssertionError, KeyError, TypeError, ValueError):
        raise ServiceError("the server sent a malformed egress event") from None


# --------------------------------------------------------------------------- sync twins


class Ports:
    """Sync twin of the remote AsyncPorts."""

    def __init__(self, inner: AsyncPorts) -> None:
        self._a = inner

    def expose(self, port: int) -> ExposedPort:
        """See AsyncPorts.expose."""
        return _portal.call(self._a.expose(port))

    def list(self) -> builtins.list[ExposedPort]:
        """See AsyncPorts.list."""
        return _portal.call(self._a.list())

    def close(self, port: int | ExposedPort) -> int:
        """See AsyncPorts.close."""
        return _portal.call(self._a.close(port))

    def wait(self, port: int, *, timeout: float = DEFAULT_WAIT) -> None:
        """See AsyncPorts.wait."""
        _portal.call(self._a.wait(port, timeout=timeout))


class Network:
    """Sync twin of the remote AsyncNetwork, plus ``policy`` (a property that asks the
    server, as the local ``network.policy`` reads the sandbox's)."""

    def __init__(self, inner: AsyncNetwork) -> None:
        self._a = inner

    @property
    def policy(self) -> NetworkPolicy | None:
        """The policy in force, fetched from the server (None: no egress)."""
        return self.get_policy()

    def info(self) -> NetworkInfo:
        """See AsyncNetwork.info."""
        return _portal.call(self._a.info())

    def get_policy(self) -> NetworkPolicy | None:
        """See AsyncNetwork.get_policy."""
        return _portal.call(self._a.get_policy())

    def set_policy(self, policy: NetworkPolicy) -> None:
        """See AsyncNetwork.set_policy."""
        _portal.call(self._a.set_policy(policy))

    def events(self, *, limit: int = 100) -> builtins.list[EgressEvent]:
        """See AsyncNetwork.events."""
        return _portal.call(self._a.events(limit=limit))
