"""Routes of warm pools: create, list, get, delete (sandboxes are taken with
``POST /v1/sandboxes {"pool": ...}``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sandvm.server.models import (
    CreatePoolRequest,
    PoolInfo,
    PoolList,
)
from sandvm.server.routes.common import (
    PoolRef,
    Tenant,
    pick,
    policy_of,
    service,
)

router = APIRouter()


@router.post("/v1/pools", status_code=201, response_model=PoolInfo, tags=["pools"],
             responses=pick(400, 401, 404, 409, 422, 429))
async def create_pool(request: Request, tenant: Tenant, body: CreatePoolRequest
                      ) -> PoolInfo:
    """Keep ``min_size`` sandboxes restored from one of the tenant's snapshots,
    waiting for ``POST /v1/sandboxes {"pool": name}``. The pool is kept across
    server restarts; its memory (``max_size`` sandboxes) counts in the quota."""
    return await service(request).library.create_pool(
        tenant, body.name, snapshot=body.snapshot, min_size=body.min_size,
        max_size=body.max_size, idle_timeout=body.idle_timeout,
        network=policy_of(body.network))


@router.get("/v1/pools", response_model=PoolList, tags=["pools"], responses=pick(401))
async def list_pools(request: Request, tenant: Tenant) -> PoolList:
    return PoolList(pools=service(request).library.list_pools(tenant))


@router.get("/v1/pools/{name}", response_model=PoolInfo, tags=["pools"],
            responses=pick(400, 401, 404))
async def get_pool(request: Request, tenant: Tenant, name: PoolRef) -> PoolInfo:
    return service(request).library.pool_info(tenant, name)


@router.delete("/v1/pools/{name}", status_code=204, response_class=Response,
               tags=["pools"], responses=pick(400, 401, 404))
async def delete_pool(request: Request, tenant: Tenant, name: PoolRef) -> Response:
    """Stop the pool and kill its waiting sandboxes (handed-out ones go on)."""
    await service(request).library.delete_pool(tenant, name)
    return Response(status_code=204)
