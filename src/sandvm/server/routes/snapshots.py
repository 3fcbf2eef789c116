"""Routes of snapshots: take one of a sandbox, list, get, delete; fork a sandbox."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sandvm.server.models import (
    CreateSnapshotRequest,
    ForkRequest,
    SandboxList,
    SnapshotInfo,
    SnapshotList,
)
from sandvm.server.routes.common import (
    SandboxId,
    SnapshotRef,
    Tenant,
    pick,
    service,
    with_facts,
)

router = APIRouter()


@router.post("/v1/sandboxes/{sandbox_id}/snapshots", status_code=201,
             response_model=SnapshotInfo, tags=["snapshots"],
             responses=pick(400, 401, 404, 409, 422, 429))
async def take_snapshot(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        body: CreateSnapshotRequest) -> SnapshotInfo:
    """Save the sandbox (memory, processes, files) as a snapshot of the tenant's;
    the sandbox goes on running (it is paused while its state is copied)."""
    return await service(request).library.snapshot(tenant, sandbox_id, body.name)


@router.get("/v1/snapshots", response_model=SnapshotList, tags=["snapshots"],
            responses=pick(401))
async def list_snapshots(request: Request, tenant: Tenant) -> SnapshotList:
    return SnapshotList(snapshots=service(request).library.list_snapshots(tenant))


@router.get("/v1/snapshots/{name}", response_model=SnapshotInfo, tags=["snapshots"],
            responses=pick(400, 401, 404, 409))
async def get_snapshot(request: Request, tenant: Tenant, name: SnapshotRef
                       ) -> SnapshotInfo:
    return service(request).library.get_snapshot(tenant, name)


@router.delete("/v1/snapshots/{name}", status_code=204, response_class=Response,
               tags=["snapshots"], responses=pick(400, 401, 404, 409))
async def delete_snapshot(request: Request, tenant: Tenant, name: SnapshotRef
                          ) -> Response:
    """Remove the snapshot (409 snapshot_in_use while a pool restores from it);
    sandboxes restored from it keep running."""
    service(request).library.delete_snapshot(tenant, name)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/fork", status_code=201,
             response_model=SandboxList, tags=["snapshots"],
             responses=pick(400, 401, 404, 409, 422, 429))
async def fork_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                       body: ForkRequest) -> SandboxList:
    """``n`` new sandboxes, running copies of this one (memory, processes, files,
    network policy), each counted in the tenant's quotas."""
    svc = service(request)
    return SandboxList(sandboxes=[with_facts(svc, i) for i in await svc.library.fork(
        tenant, sandbox_id, body.n, ttl=body.timeout)])
