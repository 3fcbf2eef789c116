"""Routes of commands: run with streamed output, background commands (start, list,
status, output from any offset, stdin, signals) and their resource figures."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from sandvm.errors import InvalidSpec
from sandvm.server.models import (
    CommandEvent,
    CommandInfo,
    CommandList,
    CommandStats,
    RunCommandRequest,
    SignalRequest,
)
from sandvm.server.routes.common import (
    CommandId,
    NDJSONResponse,
    SandboxId,
    Tenant,
    ndjson_response,
    pick,
    service,
)

router = APIRouter()


@router.post("/v1/sandboxes/{sandbox_id}/commands", response_class=NDJSONResponse,
             tags=["commands"], responses={
                 200: {"model": CommandEvent, "description": "One JSON object per line:"
                       " output chunks as they come, then one `exit` or `error`."},
                 **pick(400, 401, 404, 409, 413, 422)})
async def run_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      body: RunCommandRequest) -> NDJSONResponse:
    """Run a command; its output streams back as NDJSON while it runs. Closing the
    connection kills the command."""
    events = await service(request).run_command(
        tenant, sandbox_id, cmd=body.cmd, env=body.env, cwd=body.cwd, user=body.user,
        timeout=body.timeout, stdin=_stdin(body))
    return ndjson_response(events)


@router.post("/v1/sandboxes/{sandbox_id}/commands/start", status_code=201,
             response_model=CommandInfo, tags=["commands"],
             responses=pick(400, 401, 404, 409, 413, 422, 429))
async def start_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        body: RunCommandRequest) -> CommandInfo:
    """Start a command in the background and return at once: follow its output
    with GET .../commands/{command_id}/output. Without ``stdin``, its stdin stays
    open for POST .../stdin."""
    return await service(request).start_command(
        tenant, sandbox_id, cmd=body.cmd, env=body.env, cwd=body.cwd, user=body.user,
        timeout=body.timeout, stdin=_stdin(body))


@router.get("/v1/sandboxes/{sandbox_id}/commands", response_model=CommandList,
            tags=["commands"], responses=pick(401, 404, 409))
async def list_commands(request: Request, tenant: Tenant, sandbox_id: SandboxId
                        ) -> CommandList:
    """The sandbox's background commands (running, and the latest that ended)."""
    return CommandList(commands=service(request).list_commands(tenant, sandbox_id))


@router.get("/v1/sandboxes/{sandbox_id}/stats", response_model=CommandStats,
            tags=["commands"], responses=pick(400, 401, 404, 409, 422))
async def command_stats(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        pid: Annotated[int, Query(ge=1, le=1 << 22, description="A"
                                                  " command's pid (its handle's).")]
                        ) -> CommandStats:
    """CPU time, memory and processes of the running command ``pid``."""
    st = await service(request).on_sandbox(tenant, sandbox_id,
                                            lambda sb: sb.commands.stats(pid))
    return CommandStats(running=st.running, cpu_usec=st.cpu_usec,
                        memory_bytes=st.memory_bytes, processes=st.processes)


@router.get("/v1/sandboxes/{sandbox_id}/commands/{command_id}", response_model=CommandInfo,
            tags=["commands"], responses=pick(401, 404, 409))
async def get_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      command_id: CommandId) -> CommandInfo:
    """A background command's state (and exit, once it ended)."""
    return service(request).command_info(tenant, sandbox_id, command_id)


@router.get("/v1/sandboxes/{sandbox_id}/commands/{command_id}/output",
            response_class=NDJSONResponse, tags=["commands"], responses={
                200: {"model": CommandEvent, "description": "One JSON object per line,"
                      " each with its `seq`: output chunks, then one `exit` or `error`."},
                **pick(401, 404, 409, 422)})
async def command_output(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                         command_id: CommandId,
                         offset: Annotated[int, Query(
                             ge=0, le=1 << 62, description="The first `seq` wanted"
                             " (the oldest kept if the server dropped it).")] = 0,
                         follow: Annotated[bool, Query(
                             description="Wait for more until the command ends; false:"
                             " what is buffered now.")] = True) -> NDJSONResponse:
    """A background command's output from ``offset`` on, as NDJSON; reconnect with
    the next ``seq`` you want. Closing the connection leaves the command running."""
    events = service(request).command_output(tenant, sandbox_id, command_id,
                                              offset=offset, follow=follow)
    return ndjson_response(events)


@router.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin", status_code=204,
             response_class=Response, tags=["commands"],
             responses=pick(401, 404, 409, 413),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
async def command_stdin(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        command_id: CommandId) -> Response:
    """Write the request body (raw bytes, at most the JSON body cap) to the
    command's stdin."""
    await service(request).send_stdin(tenant, sandbox_id, command_id,
                                       await request.body())
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin/close",
             status_code=204, response_class=Response, tags=["commands"],
             responses=pick(401, 404, 409))
async def close_command_stdin(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                              command_id: CommandId) -> Response:
    """End the command's stdin (EOF); a no-op once closed or ended."""
    await service(request).close_stdin(tenant, sandbox_id, command_id)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/signal", status_code=204,
             response_class=Response, tags=["commands"],
             responses=pick(400, 401, 404, 409, 422))
async def signal_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                         command_id: CommandId, body: SignalRequest) -> Response:
    """Signal the command's process group (SIGINT interrupts, SIGTERM terminates,
    SIGKILL kills); a no-op once it ended."""
    await service(request).signal_command(tenant, sandbox_id, command_id,
                                           signal=body.signal, grace=body.grace)
    return Response(status_code=204)


def _stdin(body: RunCommandRequest) -> bytes | None:
    """The command's stdin from ``stdin`` (text) or ``stdin_b64``. Raises InvalidSpec."""
    if body.stdin is not None and body.stdin_b64 is not None:
        raise InvalidSpec("give stdin or stdin_b64, not both")
    if body.stdin is not None:
        return body.stdin.encode()
    if body.stdin_b64 is not None:
        try:
            return base64.b64decode(body.stdin_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidSpec("stdin_b64 is not valid base64") from None
    return None
