"""Exposed ports and egress policies of the server's sandboxes (``SandboxService.networking``).

Ownership, the port quota and the held sandboxes come from the server's ``Tenancy``.

The server holds each sandbox as a local AsyncSandbox, so exposing a guest port is the
local ``ports.expose`` on the server's host (``ServerConfig.port_host``, 127.0.0.1 by
default; the server picks the host port), and a policy update is the local
``network.set_policy``.

Exposures are recorded in the server's store: a listener lives in the server process
and ends with it, so a server that starts re-attaches (in the background) to every
live sandbox with recorded ports and listens for them again, on the same host port if
it is free (else on another one: the record, and so ``GET .../ports``, says where).
A tenant keeps at most ``max_tenant_ports`` ports exposed over its live sandboxes.

Policies need no record here: the runtime's journal keeps a managed sandbox's policy
and its egress byte count, and ``attach`` restores both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from typing import TYPE_CHECKING

from sandvm.egress import NetworkPolicy
from sandvm.errors import InvalidSpec, PortInUse, SandvmError
from sandvm.network import egress_bytes, egress_connections
from sandvm.ports import ExposedPort, check_port
from sandvm.server.models import (
    EgressEventInfo,
    NetworkInfo,
    NetworkPolicyView,
    PortInfo,
)

if TYPE_CHECKING:
    from sandvm.sandbox import AsyncSandbox
    from sandvm.server.tenancy import Tenancy

log = logging.getLogger("sandvm.server")

MAX_EVENTS = 1000  # events one request returns at most (the proxy keeps as many)
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def url_host(bind_host: str, request_host: str | None) -> str:
    """The host of an exposed port's URL. A listener on a wildcard address (0.0.0.0,
    ::) is reached the way the client reached the server (the request's Host), else at
    its own address."""
    if not ipaddress.ip_address(bind_host).is_unspecified:
        return bind_host
    name = (request_host or "").strip()
    if name.startswith("["):  # [v6]:port
        name = name[1:name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.split(":")[0]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    return name if _HOSTNAME.fullmatch(name) else "127.0.0.1"


def policy_view(policy: NetworkPolicy | None) -> NetworkPolicyView | None:
    if policy is None:
        return None
    return NetworkPolicyView(allow=list(policy.allow), ports=list(policy.ports),
                             allow_http=policy.allow_http, max_bytes=policy.max_bytes)


class Networking:
    """The ports and network part of a SandboxService. Its ``Tenancy`` calls
    ``attached`` each time it attaches to a sandbox again (register with
    ``tenancy.on_attach(networking.attached)``)."""

    def __init__(self, tenancy: Tenancy) -> None:
        self.tenancy = tenancy
        self.store = tenancy.store  # the server's store (exposed ports)
        self.config = tenancy.config
        self.metrics = tenancy.metrics
        self._reopening: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one expose or close at a time: records match listeners

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Forget the ports of sandboxes that ended; listen again, in the background, for
        those of the live ones (a restarted server)."""
        self.store.prune_exposed()
        ids = self.store.with_exposed_ports()
        if ids:
            self._reopening = asyncio.get_running_loop().create_task(self._reopen(ids))

    async def stop(self) -> None:
        if self._reopening is not None:
            self._reopening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reopening

    async def _reopen(self, ids: list[str]) -> None:
        for sid in ids:
            try:
                await self.tenancy.hold(sid)  # attaching re-opens its ports (``attached``)
            except SandvmError as exc:
                log.warning("could not re-open the exposed ports of %s: %s", sid, exc.message)
            except Exception:
                log.exception("could not re-open the exposed ports of %s", sid)

    async def attached(self, sandbox_id: str, sb: AsyncSandbox) -> None:
        """``sb`` was just attached: listen again for its recorded ports. Never raises."""
        for port, host, host_port in self.store.exposed(sandbox_id):
            try:
                try:
                    addr = await sb.ports.expose(port, host=host, host_port=host_port)
                except PortInUse:  # taken meanwhile: another one
                    addr = await sb.ports.expose(port, host=host)
                self.store.set_host_port(sandbox_id, port, addr.host, addr.port)
            except SandvmError as exc:
                log.warning("could not re-open port %d of %s: %s", port, sandbox_id,
                            exc.message)
            except Exception:
                log.exception("could not re-open port %d of %s", port, sandbox_id)

    # ------------------------------------------------------------------ ports

    def _info(self, port: int, host: str, host_port: int, request_host: str | None
              ) -> PortInfo:
        addr = ExposedPort(url_host(host, request_host), host_port, port)
        return PortInfo(port=port, url=addr.url, host=addr.host, host_port=host_port)

    async def expose(self, tenant: str, sandbox_id: str, port: int, *,
                     request_host: str | None = None) -> PortInfo:
        """Listen on the server's host for guest ``port`` (or return the listener that
        does already). Raises QuotaExceeded (the tenant's ports), InvalidSpec, PortError,
        VmNotFound, SandboxStateError."""
        port = check_port(port)
        sb = await self.tenancy.held(tenant, sandbox_id)
        host = self.config.port_host
        async with self._lock:
            known = any(p == port for p, _, _ in self.store.exposed(sandbox_id))
            self.tenancy.reserve_port(tenant, sandbox_id, port, host)
            try:
                addr = await sb.ports.expose(port, host=host)
            except BaseException as exc:
                if not known:
                    self.store.unexpose(sandbox_id, port)
                if isinstance(exc, SandvmError):
                    raise await self.tenancy.explain(sandbox_id, exc) from exc
                raise
            self.store.set_host_port(sandbox_id, port, addr.host, addr.port)
        if not known:
            self.metrics.ports_exposed.inc()
        return self._info(port, addr.host, addr.port, request_host)

    async def list_ports(self, tenant: str, sandbox_id: str, *,
                         request_host: str | None = None) -> list[PortInfo]:
        """The sandbox's exposed ports, by guest port (attaching to it re-opens them)."""
        await self.tenancy.held(tenant, sandbox_id)
        return [self._info(p, h, hp, request_host)
                for p, h, hp in self.store.exposed(sandbox_id) if hp]

    async def close(self, tenant: str, sandbox_id: str, port: int) -> int:
        """Stop exposing guest ``port`` (its open connections are reset); returns how
        many listeners were closed (0: it was not exposed)."""
        port = check_port(port)
        sb = await self.tenancy.held(tenant, sandbox_id)
        async with self._lock:
            recorded = self.store.unexpose(sandbox_id, port)
            closed = await sb.ports.close(port)
        return max(closed, int(recorded))

    async def wait(self, tenant: str, sandbox_id: str, port: int, *, timeout: float
                   ) -> None:
        """Return once a server in the guest listens on ``port``. Raises PortTimeout."""
        port = check_port(port)
        sb = await self.tenancy.held(tenant, sandbox_id)
        try:
            await sb.ports.wait(port, timeout=timeout)
        except SandvmError as exc:
            raise await self.tenancy.explain(sandbox_id, exc) from exc

    # ------------------------------------------------------------------ network

    @staticmethod
    def _network_info(sb: AsyncSandbox) -> NetworkInfo:
        net = sb.network
        return NetworkInfo(enabled=net.enabled, policy=policy_view(net.policy),
                           bytes_total=egress_bytes(net),
                           connections=egress_connections(net))

    async def network(self, tenant: str, sandbox_id: str) -> NetworkInfo:
        return self._network_info(await self.tenancy.held(tenant, sandbox_id))

    async def set_policy(self, tenant: str, sandbox_id: str, policy: NetworkPolicy
                         ) -> NetworkInfo:
        """Replace the sandbox's egress policy at once (open connections it refuses are
        closed); on a sandbox made without one, this starts its egress (as locally).
        Raises InvalidSpec, VmNotFound, SandboxStateError."""
        if policy.allow_ips or policy.hosts:
            raise InvalidSpec("allow_ips and hosts are the server operator's, not API"
                              " clients'")
        sb = await self.tenancy.held(tenant, sandbox_id)
        try:
            await sb.network.set_policy(policy)
        except SandvmError as exc:
            raise await self.tenancy.explain(sandbox_id, exc) from exc
        return self._network_info(sb)

    async def events(self, tenant: str, sandbox_id: str, *, limit: int = 100
                     ) -> list[EgressEventInfo]:
        """The egress proxy's latest ``limit`` decisions, oldest first."""
        sb = await self.tenancy.held(tenant, sandbox_id)
        limit = max(0, min(limit, MAX_EVENTS))
        events = sb.network.events()[-limit:] if limit else []
        return [EgressEventInfo(ts=e.ts, action=e.action, method=e.method, host=e.host,
                                port=e.port, reason=e.reason, address=e.address,
                                bytes_out=e.bytes_out, bytes_in=e.bytes_in,
                                seconds=e.seconds, count=e.count) for e in events]
