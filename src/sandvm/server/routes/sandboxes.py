"""Routes of sandboxes: create (boot, restore, from a pool), list, get, kill, TTL,
pause/resume, ping."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sandvm.errors import InvalidSpec
from sandvm.server.models import (
    CreateSandboxRequest,
    Ping,
    SandboxInfo,
    SandboxList,
    SetTimeoutRequest,
)
from sandvm.server.routes.common import (
    SandboxId,
    Tenant,
    pick,
    policy_of,
    service,
    with_facts,
)

router = APIRouter()


@router.post("/v1/sandboxes", status_code=201, response_model=SandboxInfo,
             tags=["sandboxes"], responses=pick(400, 401, 404, 409, 413, 422, 429, 500, 503))
async def create_sandbox(request: Request, tenant: Tenant,
                         body: CreateSandboxRequest) -> SandboxInfo:
    """Boot a sandbox owned by the key's tenant; it lives ``timeout`` seconds. With
    ``snapshot`` it is restored from one of the tenant's snapshots instead; with
    ``pool`` it is taken from one of the tenant's pools (503 pool_exhausted if none
    became ready in time)."""
    svc = service(request)
    network = policy_of(body.network)
    if body.wait is not None and body.pool is None:
        raise InvalidSpec("wait is for taking a sandbox from a pool: give pool too")
    if body.snapshot is not None or body.pool is not None:
        given = body.model_fields_set & {"image", "memory_mib", "vcpus"}
        if body.snapshot is not None and body.pool is not None:
            raise InvalidSpec("give snapshot or pool, not both")
        if given:
            raise InvalidSpec(f"{', '.join(sorted(given))}: set by the"
                              f" {'snapshot' if body.snapshot else 'pool'}; leave out")
        if body.pool is not None:
            if network is not None:
                raise InvalidSpec("a pool's sandboxes have the pool's network policy:"
                                  " leave network out (PUT .../network changes it)")
            return with_facts(svc, await svc.library.from_pool(
                tenant, body.pool, ttl=body.timeout, wait=body.wait))
        assert body.snapshot is not None
        return with_facts(svc, await svc.library.from_snapshot(
            tenant, body.snapshot, ttl=body.timeout, network=network))
    return with_facts(svc, await svc.create(
        tenant, image=body.image, memory_mib=body.memory_mib, vcpus=body.vcpus,
        ttl=body.timeout, network=network))


@router.get("/v1/sandboxes", response_model=SandboxList, tags=["sandboxes"],
            responses=pick(401))
async def list_sandboxes(request: Request, tenant: Tenant) -> SandboxList:
    """The tenant's running sandboxes."""
    svc = service(request)
    return SandboxList(sandboxes=[with_facts(svc, i) for i in svc.list_sandboxes(tenant)])


@router.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxInfo, tags=["sandboxes"],
            responses=pick(401, 404, 409))
async def get_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                      ) -> SandboxInfo:
    svc = service(request)
    return with_facts(svc, svc.get(tenant, sandbox_id))


@router.delete("/v1/sandboxes/{sandbox_id}", status_code=204, response_class=Response,
               tags=["sandboxes"], responses=pick(401, 404, 409))
async def kill_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                       ) -> Response:
    """Destroy the sandbox and everything in it."""
    await service(request).kill(tenant, sandbox_id)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/timeout", response_model=SandboxInfo,
             tags=["sandboxes"], responses=pick(400, 401, 404, 409, 422))
async def set_timeout(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      body: SetTimeoutRequest) -> SandboxInfo:
    """Let the sandbox live ``timeout`` more seconds from now."""
    svc = service(request)
    return with_facts(svc, svc.set_timeout(tenant, sandbox_id, body.timeout))


@router.post("/v1/sandboxes/{sandbox_id}/pause", status_code=204, response_class=Response,
             tags=["sandboxes"], responses=pick(401, 404, 409))
async def pause_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                        ) -> Response:
    """Freeze the sandbox's vCPUs (its memory stays allocated, its TTL runs on)
    until POST .../resume."""
    await service(request).on_sandbox(tenant, sandbox_id, lambda sb: sb.pause())
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/resume", status_code=204, response_class=Response,
             tags=["sandboxes"], responses=pick(401, 404, 409))
async def resume_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                         ) -> Response:
    """Let a paused sandbox run again, its clock set to the host's."""
    await service(request).on_sandbox(tenant, sandbox_id, lambda sb: sb.resume())
    return Response(status_code=204)


@router.get("/v1/sandboxes/{sandbox_id}/ping", response_model=Ping, tags=["sandboxes"],
            responses=pick(401, 404, 409))
async def ping_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId) -> Ping:
    """The guest agent's round trip, in seconds."""
    return Ping(seconds=await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.ping()))
