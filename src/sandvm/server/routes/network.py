"""Routes of ports (exposed on the server's host) and network (egress policy and
events)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from sandvm.server.models import (
    ClosedPorts,
    EgressEventList,
    ExposePortRequest,
    NetworkInfo,
    NetworkPolicyBody,
    PortInfo,
    PortList,
    WaitPortRequest,
)
from sandvm.server.routes.common import (
    GuestPort,
    SandboxId,
    Tenant,
    pick,
    policy_of,
    service,
)

router = APIRouter()


@router.post("/v1/sandboxes/{sandbox_id}/ports", status_code=201, response_model=PortInfo,
             tags=["ports"], responses=pick(400, 401, 404, 409, 422, 429))
async def expose_port(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      body: ExposePortRequest) -> PortInfo:
    """Listen on the server's host (its ``--port-host``, 127.0.0.1 by default; a free
    host port) and tunnel every connection to guest port ``port``. Exposing a port
    again returns its listener. Listeners end with the sandbox or DELETE; a server
    restart re-opens them (on the same host port if it is free)."""
    return await service(request).networking.expose(
        tenant, sandbox_id, body.port, request_host=request.headers.get("host"))


@router.get("/v1/sandboxes/{sandbox_id}/ports", response_model=PortList, tags=["ports"],
            responses=pick(401, 404, 409))
async def list_ports(request: Request, tenant: Tenant, sandbox_id: SandboxId
                     ) -> PortList:
    """The sandbox's exposed ports, by guest port."""
    return PortList(ports=await service(request).networking.list_ports(
        tenant, sandbox_id, request_host=request.headers.get("host")))


@router.delete("/v1/sandboxes/{sandbox_id}/ports/{port}", response_model=ClosedPorts,
               tags=["ports"], responses=pick(401, 404, 409, 422))
async def close_port(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                     port: GuestPort) -> ClosedPorts:
    """Stop exposing the guest port (its open connections are reset); ``closed`` is 0
    if it was not exposed."""
    return ClosedPorts(closed=await service(request).networking.close(
        tenant, sandbox_id, port))


@router.post("/v1/sandboxes/{sandbox_id}/ports/{port}/wait", status_code=204,
             response_class=Response, tags=["ports"],
             responses=pick(400, 401, 404, 409, 422, 504))
async def wait_port(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                    port: GuestPort, body: WaitPortRequest) -> Response:
    """Return (204) once a server in the guest listens on the port (on 127.0.0.1,
    0.0.0.0 or ::); 504 (port_timeout) after ``timeout`` seconds."""
    await service(request).networking.wait(tenant, sandbox_id, port,
                                            timeout=body.timeout)
    return Response(status_code=204)


@router.get("/v1/sandboxes/{sandbox_id}/network", response_model=NetworkInfo,
            tags=["network"], responses=pick(401, 404, 409))
async def get_network(request: Request, tenant: Tenant, sandbox_id: SandboxId
                      ) -> NetworkInfo:
    """The sandbox's egress policy (null: no egress) and its byte count."""
    return await service(request).networking.network(tenant, sandbox_id)


@router.put("/v1/sandboxes/{sandbox_id}/network", response_model=NetworkInfo,
            tags=["network"], responses=pick(400, 401, 404, 409, 422))
async def set_network(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      body: NetworkPolicyBody) -> NetworkInfo:
    """Replace the egress policy at once (open connections it refuses are closed).
    On a sandbox created without network this starts its egress, as locally:
    commands started afterwards get the proxy variables."""
    policy = policy_of(body)
    assert policy is not None
    return await service(request).networking.set_policy(tenant, sandbox_id, policy)


@router.get("/v1/sandboxes/{sandbox_id}/network/events", response_model=EgressEventList,
            tags=["network"], responses=pick(401, 404, 409, 422))
async def network_events(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                         limit: Annotated[int, Query(
                             ge=1, le=1000, description="The latest this many.")] = 100
                         ) -> EgressEventList:
    """The egress proxy's latest decisions (allow, deny, error, close), oldest first
    (none without egress)."""
    return EgressEventList(events=await service(request).networking.events(
        tenant, sandbox_id, limit=limit))
