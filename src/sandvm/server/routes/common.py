"""What the route modules share: the service and the caller's tenant, path and query
parameter types, the documented error responses, streamed response classes, and the
conversions between request bodies and sandvm's own types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Path, Query, Request, Security
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sandvm.egress import NetworkPolicy
from sandvm.server.models import ErrorBody, NetworkPolicyBody, SandboxInfo
from sandvm.server.service import SandboxService, ndjson


def service(request: Request) -> SandboxService:
    """The app's service (started with the app)."""
    svc: SandboxService = request.app.state.service
    return svc


_bearer = HTTPBearer(auto_error=False, description="An API key from `sandvm key create NAME`.")


def tenant_of(request: Request, _credentials: Annotated[
        HTTPAuthorizationCredentials | None, Security(_bearer)] = None) -> str:
    """The caller's tenant (the guard authenticated the key before routing)."""
    tenant: str = request.scope["sandvm.tenant"]
    return tenant


Tenant = Annotated[str, Security(tenant_of)]
SandboxId = Annotated[str, Path(max_length=63, description="A sandbox id (`sb-...`).")]
CommandId = Annotated[str, Path(max_length=63, description="A command id (`cmd-...`).")]
SnapshotRef = Annotated[str, Path(max_length=63, description="A snapshot name.")]
PoolRef = Annotated[str, Path(max_length=63, description="A pool name.")]
GuestPort = Annotated[int, Path(ge=1, le=65535, description="A guest TCP port.")]
GuestPath = Annotated[str, Query(min_length=1, max_length=4096,
                                 description="Absolute path in the guest (else 400,"
                                             " code invalid_path, as locally).")]

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in (
        (400, "Bad input (code invalid_spec, invalid_path, ...)."),
        (401, "Missing or invalid API key (code unauthenticated)."),
        (403, "The guest refused (code permission_denied)."),
        (404, "No such sandbox for this key's tenant (code vm_not_found), no such file"
              " (file_not_found), command (unknown_command), snapshot"
              " (snapshot_not_found) or pool (pool_not_found)."),
        (409, "The sandbox has ended or is busy (code sandbox_state, sandbox_busy), or"
              " a name is taken or in use (snapshot_already_exists, pool_exists,"
              " snapshot_in_use, ...)."),
        (413, "Over a size cap (code request_too_large, file_too_large)."),
        (422, "The request does not match its schema (code invalid_spec)."),
        (429, "The tenant's quota is used up (code quota_exceeded), or it sent more"
              " requests than the server's rate limit (code rate_limited; wait"
              " Retry-After seconds)."),
        (500, "A server-side failure (e.g. vm_boot_failed, agent_error)."),
        (503, "The pool had no sandbox ready in time (code pool_exhausted)."),
        (504, "Nothing listened on the guest port in time (code port_timeout)."),
    )}


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


class OctetStreamResponse(StreamingResponse):
    media_type = "application/octet-stream"


def ndjson_response(events: AsyncIterator[dict[str, Any]]) -> NDJSONResponse:
    """A command's events as an NDJSON body, sent as they come and never cached."""
    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            yield ndjson(event)

    return NDJSONResponse(lines(), headers={"Cache-Control": "no-store",
                                            "X-Content-Type-Options": "nosniff"})


def policy_of(body: NetworkPolicyBody | None) -> NetworkPolicy | None:
    if body is None:
        return None
    return NetworkPolicy(allow=tuple(body.allow), ports=tuple(body.ports),
                         allow_http=body.allow_http, max_bytes=body.max_bytes)


def with_facts(svc: SandboxService, info: SandboxInfo) -> SandboxInfo:
    """``info`` with what the server knows of the sandbox's VM (accelerator, boot
    seconds, guest kernel, agent version)."""
    return SandboxInfo(**{**vars(info), **svc.vm_facts(info.sandbox_id)})


def pick(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: ERRORS[s] for s in statuses}
