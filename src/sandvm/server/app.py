"""The HTTP API: FastAPI routes that parse a request and call the service, nothing more.

``create_app(config)`` builds the application; `sandvm serve` runs it on uvicorn.
In front of every route a guard (plain ASGI) gives the request its id
(``X-Request-Id``), caps the headers, authenticates the API key (every path but
``/health`` and ``/openapi.json``; a WebSocket on every path, refused before it
opens), caps the body (JSON bodies are read whole up to ``max_json_bytes``, uploads
stream up to ``max_upload_bytes``) and counts the request for ``/metrics``; other
connection types are refused. Errors are JSON ``{"code": ..., "message": ...}`` with
the stable codes of ``sandvm.errors``, their messages as ``sandvm.server.redact``
lets a client see them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandvm.egress import NetworkPolicy
from sandvm.errors import InvalidSpec, RequestTooLarge, SandvmError, Unauthenticated
from sandvm.server.config import ServerConfig
from sandvm.server.metrics import CONTENT_TYPE as METRICS_TYPE
from sandvm.server.models import (
    MAX_LIST_DEPTH,
    ChownRequest,
    ClosedPorts,
    CommandEvent,
    CommandInfo,
    CommandList,
    CommandStats,
    CreatePoolRequest,
    CreateSandboxRequest,
    CreateSnapshotRequest,
    DirTransfer,
    EgressEventList,
    EntryInfo,
    EntryList,
    ErrorBody,
    Exists,
    ExposePortRequest,
    ForkRequest,
    Health,
    MadeDir,
    MakeDirRequest,
    NetworkInfo,
    NetworkPolicyBody,
    Ping,
    PoolInfo,
    PoolList,
    PortInfo,
    PortList,
    RenameRequest,
    RunCommandRequest,
    SandboxInfo,
    SandboxList,
    SetTimeoutRequest,
    SignalRequest,
    SnapshotInfo,
    SnapshotList,
    TmpfsRequest,
    TreeEvent,
    WaitPortRequest,
    WriteResult,
)
from sandvm.server.ratelimit import limiter_for, retry_after_seconds
from sandvm.server.redact import (
    Redactor,
    default_redactor,
    escape_text,
    new_request_id,
    request_id,
    status_for,
)
from sandvm.server.service import SandboxService, ndjson
from sandvm.values import DirTransfer as LocalDirTransfer
from sandvm.values import EntryInfo as LocalEntryInfo

log = logging.getLogger("sandvm.server")

PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})
MAX_HEADERS = 100
_UPLOAD_RE = re.compile(r"/v1/sandboxes/[^/]+/files(?:/tree)?")

def error_response(exc: SandvmError, status: int | None = None, *,
                   headers: dict[str, str] | None = None,
                   redactor: Redactor | None = None) -> JSONResponse:
    """The JSON error response for ``exc``: its message as ``redactor`` (default: one
    for sandvm's own directories) lets a client see it (see sandvm.server.redact)."""
    status = status or status_for(exc)
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sandvm"'
    body = (redactor or default_redactor()).public(exc, status=status)
    return JSONResponse(body, status_code=status, headers=headers or None)


def _service(request: Request) -> SandboxService:
    svc: SandboxService = request.app.state.service
    return svc


_bearer = HTTPBearer(auto_error=False, description="An API key from `sandvm key create NAME`.")


def _tenant(request: Request, _credentials: Annotated[
        HTTPAuthorizationCredentials | None, Security(_bearer)] = None) -> str:
    """The caller's tenant (the guard authenticated the key before routing)."""
    tenant: str = request.scope["sandvm.tenant"]
    return tenant


Tenant = Annotated[str, Security(_tenant)]
SandboxId = Annotated[str, Path(max_length=63, description="A sandbox id (`sb-...`).")]
CommandId = Annotated[str, Path(max_length=63, description="A command id (`cmd-...`).")]
SnapshotRef = Annotated[str, Path(max_length=63, description="A snapshot name.")]
PoolRef = Annotated[str, Path(max_length=63, description="A pool name.")]
GuestPort = Annotated[int, Path(ge=1, le=65535, description="A guest TCP port.")]
GuestPath = Annotated[str, Query(min_length=1, max_length=4096,
                                 description="Absolute path in the guest (else 400,"
                                             " code invalid_path, as locally).")]

_ERRORS: dict[int | str, dict[str, Any]] = {
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


class _Guard:
    """Header caps, authentication, body caps and request metrics, before routing."""

    def __init__(self, app: ASGIApp, *, config: ServerConfig, fastapi: FastAPI) -> None:
        self.app = app
        self.config = config
        self.fastapi = fastapi
        self.limiter = limiter_for(config.rate_limit, config.rate_burst)
        self.redactor = Redactor([config.state_dir])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await self._websocket(scope, receive, send)
            return
        if kind != "http":  # nothing else is served: fail closed
            raise RuntimeError(f"sandvm serves no {kind!r} connections")
        t0 = time.monotonic()
        status = [500]
        rid = new_request_id().encode()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                   (b"x-request-id", rid)]}
                status[0] = message["status"]
                svc = getattr(self.fastapi.state, "service", None)
                if svc is not None:
                    svc.metrics.request_seconds.observe(time.monotonic() - t0,
                                                        route=self._route(scope))
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            svc = getattr(self.fastapi.state, "service", None)
            if svc is not None:
                method = scope.get("method")
                svc.metrics.requests.inc(method=method if method in _METHODS else "other",
                                         route=self._route(scope), status=str(status[0]))

    def _route(self, scope: Scope) -> str:
        """The route template (a fixed set of labels), also for requests the guard
        answered before routing."""
        route = scope.get("route")
        if route is None:
            for r in self.fastapi.router.routes:
                if r.matches(scope)[0] != Match.NONE:
                    route = r
                    break
        return str(getattr(route, "path", "unmatched"))

    def _admit(self, scope: Scope, *, public: bool) -> JSONResponse | None:
        """The refusal of a request or WebSocket (over the header caps, no valid key,
        over the rate limit), or None: admitted, its tenant in ``scope`` (``public``:
        the path needs no key)."""
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > \
                self.config.max_header_bytes:
            return error_response(RequestTooLarge(
                f"request headers are over this server's cap ({MAX_HEADERS} headers,"
                f" {self.config.max_header_bytes} bytes)"), 431, redactor=self.redactor)
        if public:
            return None
        svc: SandboxService | None = getattr(self.fastapi.state, "service", None)
        if svc is None:
            return error_response(SandvmError("the server is starting"), 503,
                                  redactor=self.redactor)
        auth = next((v for k, v in headers if k == b"authorization"), None)
        try:
            scope["sandvm.tenant"] = svc.authenticate(
                auth.decode("latin-1") if auth is not None else None)
        except Unauthenticated as exc:
            return error_response(exc, redactor=self.redactor)
        if self.limiter is not None:  # per tenant, after authentication
            wait = self.limiter.take(scope["sandvm.tenant"])
            if wait > 0:
                svc.metrics.rate_limited.inc()
                return error_response(self.limiter.error(wait), headers={
                    "Retry-After": str(retry_after_seconds(wait))}, redactor=self.redactor)
        return None

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket is admitted like a request, on every path (no public ones):
        without a valid key it is refused before it opens, with the error response
        where the server can send one (else closed with 1008, policy violation)."""
        new_request_id()
        scope.pop("sandvm.tenant", None)  # only _admit puts it there
        refusal = self._admit(scope, public=False)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await refusal(scope, receive, send)  # an HTTP answer to the upgrade
        else:
            code = json.loads(bytes(refusal.body)).get("code", "refused")
            await send({"type": "websocket.close", "code": 1008, "reason": str(code)[:100]})

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        path: str = scope.get("path", "")
        scope.pop("sandvm.tenant", None)  # only _admit puts it there
        refusal = self._admit(scope, public=path in PUBLIC_PATHS)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        length_h = next((v for k, v in headers if k == b"content-length"), None)
        try:
            length = int(length_h) if length_h is not None else None
        except ValueError:
            length = None
        if scope.get("method") == "PUT" and _UPLOAD_RE.fullmatch(path):
            cap = self.config.max_upload_bytes
            if length is not None and length > cap:
                await error_response(RequestTooLarge(
                    f"the file is {length} bytes; this server takes at most {cap} per"
                    " upload"), redactor=self.redactor)(scope, receive, send)
                return
            await self.app(scope, receive, send)  # streamed; the service counts the bytes
            return
        cap = self.config.max_json_bytes
        if length is not None and length > cap:
            await error_response(RequestTooLarge(
                f"the request body is {length} bytes, over this server's cap of {cap}"),
                redactor=self.redactor)(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > cap:
                await error_response(RequestTooLarge(
                    f"the request body is over this server's cap of {cap} bytes"),
                    redactor=self.redactor)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def create_app(config: ServerConfig | None = None, *,
               service: SandboxService | None = None) -> FastAPI:
    """The sandvm HTTP API. The service (``SandboxService(config)`` unless given) is
    started when the app starts and stopped (its sandboxes detached) when it stops."""
    from sandvm.version import __version__

    cfg = config or (service.config if service is not None else ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or SandboxService(cfg)
        await svc.start()
        app.state.service = svc
        try:
            yield
        finally:
            await svc.stop()
            app.state.service = None

    app = FastAPI(title="sandvm", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, generate_unique_id_function=lambda route: route.name,
                  description="Self-hosted microVM sandboxes over HTTP."
                  " Every /v1 request needs `Authorization: Bearer <key>`; errors are"
                  " JSON objects with a stable `code` and a `message`.")
    app.state.service = None
    app.add_middleware(_Guard, config=cfg, fastapi=app)
    redactor = Redactor([cfg.state_dir])  # what errors may tell clients

    @app.exception_handler(SandvmError)
    async def _sandvm_error(request: Request, exc: SandvmError) -> JSONResponse:
        return error_response(exc, redactor=redactor)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:10]:
            loc = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return error_response(InvalidSpec("invalid request: " + "; ".join(parts)), 422,
                              redactor=redactor)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        from sandvm.errors import ServiceError

        what = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        allow = None
        if exc.status_code == 405:  # Allow: every method of the path (RFC 9110), not only
            # those of the first route that matched it; of the templates that match, the
            # most literal ones (.../commands/start, not .../commands/{command_id})
            matches = [r for r in app.router.routes if isinstance(r, Route) and r.methods
                       and r.path_regex.fullmatch(request.url.path)]
            fewest = min((r.path.count("{") for r in matches), default=0)
            methods = set().union(*(r.methods or set() for r in matches
                                    if r.path.count("{") == fewest))
            allow = {"Allow": ", ".join(sorted(methods))}
        return error_response(ServiceError(f"{what}: {request.method} {request.url.path}"),
                              exc.status_code, headers=allow, redactor=redactor)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # an upload whose client went away: nothing was written, nobody reads this
        return error_response(SandvmError("the client went away mid-request"), 400,
                              redactor=redactor)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s: unexpected error in %s %s", request_id(), request.method,
                      escape_text(request.url.path))
        return error_response(SandvmError("internal server error (logged on the server,"
                                          f" request {request_id()})"), 500,
                              redactor=redactor)

    # ------------------------------------------------------------------ public

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Liveness: no key needed."""
        return Health(status="ok", version=__version__)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["server"],
             responses={200: {"description": "Prometheus text format (0.0.4)."},
                        401: _ERRORS[401]})
    async def metrics(request: Request, tenant: Tenant) -> PlainTextResponse:
        """Prometheus metrics (any valid key; aggregate figures, no tenant labels)."""
        return PlainTextResponse(_service(request).metrics.render(), media_type=METRICS_TYPE)

    # ------------------------------------------------------------------ sandboxes

    @app.post("/v1/sandboxes", status_code=201, response_model=SandboxInfo,
              tags=["sandboxes"], responses=_pick(400, 401, 404, 409, 413, 422, 429, 500, 503))
    async def create_sandbox(request: Request, tenant: Tenant,
                             body: CreateSandboxRequest) -> SandboxInfo:
        """Boot a sandbox owned by the key's tenant; it lives ``timeout`` seconds. With
        ``snapshot`` it is restored from one of the tenant's snapshots instead; with
        ``pool`` it is taken from one of the tenant's pools (503 pool_exhausted if none
        became ready in time)."""
        svc = _service(request)
        network = _policy(body.network)
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
                return _with_facts(svc, await svc.library.from_pool(
                    tenant, body.pool, ttl=body.timeout, wait=body.wait))
            assert body.snapshot is not None
            return _with_facts(svc, await svc.library.from_snapshot(
                tenant, body.snapshot, ttl=body.timeout, network=network))
        return _with_facts(svc, await svc.create(
            tenant, image=body.image, memory_mib=body.memory_mib, vcpus=body.vcpus,
            ttl=body.timeout, network=network))

    @app.get("/v1/sandboxes", response_model=SandboxList, tags=["sandboxes"],
             responses=_pick(401))
    async def list_sandboxes(request: Request, tenant: Tenant) -> SandboxList:
        """The tenant's running sandboxes."""
        svc = _service(request)
        return SandboxList(sandboxes=[_with_facts(svc, i) for i in svc.list_sandboxes(tenant)])

    @app.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxInfo, tags=["sandboxes"],
             responses=_pick(401, 404, 409))
    async def get_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                          ) -> SandboxInfo:
        svc = _service(request)
        return _with_facts(svc, svc.get(tenant, sandbox_id))

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, response_class=Response,
                tags=["sandboxes"], responses=_pick(401, 404, 409))
    async def kill_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                           ) -> Response:
        """Destroy the sandbox and everything in it."""
        await _service(request).kill(tenant, sandbox_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/timeout", response_model=SandboxInfo,
              tags=["sandboxes"], responses=_pick(400, 401, 404, 409, 422))
    async def set_timeout(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          body: SetTimeoutRequest) -> SandboxInfo:
        """Let the sandbox live ``timeout`` more seconds from now."""
        svc = _service(request)
        return _with_facts(svc, svc.set_timeout(tenant, sandbox_id, body.timeout))

    @app.post("/v1/sandboxes/{sandbox_id}/pause", status_code=204, response_class=Response,
              tags=["sandboxes"], responses=_pick(401, 404, 409))
    async def pause_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                            ) -> Response:
        """Freeze the sandbox's vCPUs (its memory stays allocated, its TTL runs on)
        until POST .../resume."""
        await _service(request).on_sandbox(tenant, sandbox_id, lambda sb: sb.pause())
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/resume", status_code=204, response_class=Response,
              tags=["sandboxes"], responses=_pick(401, 404, 409))
    async def resume_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId
                             ) -> Response:
        """Let a paused sandbox run again, its clock set to the host's."""
        await _service(request).on_sandbox(tenant, sandbox_id, lambda sb: sb.resume())
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/ping", response_model=Ping, tags=["sandboxes"],
             responses=_pick(401, 404, 409))
    async def ping_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId) -> Ping:
        """The guest agent's round trip, in seconds."""
        return Ping(seconds=await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.ping()))

    # ------------------------------------------------------------------ snapshots, fork

    @app.post("/v1/sandboxes/{sandbox_id}/snapshots", status_code=201,
              response_model=SnapshotInfo, tags=["snapshots"],
              responses=_pick(400, 401, 404, 409, 422, 429))
    async def take_snapshot(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                            body: CreateSnapshotRequest) -> SnapshotInfo:
        """Save the sandbox (memory, processes, files) as a snapshot of the tenant's;
        the sandbox goes on running (it is paused while its state is copied)."""
        return await _service(request).library.snapshot(tenant, sandbox_id, body.name)

    @app.get("/v1/snapshots", response_model=SnapshotList, tags=["snapshots"],
             responses=_pick(401))
    async def list_snapshots(request: Request, tenant: Tenant) -> SnapshotList:
        return SnapshotList(snapshots=_service(request).library.list_snapshots(tenant))

    @app.get("/v1/snapshots/{name}", response_model=SnapshotInfo, tags=["snapshots"],
             responses=_pick(400, 401, 404, 409))
    async def get_snapshot(request: Request, tenant: Tenant, name: SnapshotRef
                           ) -> SnapshotInfo:
        return _service(request).library.get_snapshot(tenant, name)

    @app.delete("/v1/snapshots/{name}", status_code=204, response_class=Response,
                tags=["snapshots"], responses=_pick(400, 401, 404, 409))
    async def delete_snapshot(request: Request, tenant: Tenant, name: SnapshotRef
                              ) -> Response:
        """Remove the snapshot (409 snapshot_in_use while a pool restores from it);
        sandboxes restored from it keep running."""
        _service(request).library.delete_snapshot(tenant, name)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/fork", status_code=201,
              response_model=SandboxList, tags=["snapshots"],
              responses=_pick(400, 401, 404, 409, 422, 429))
    async def fork_sandbox(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                           body: ForkRequest) -> SandboxList:
        """``n`` new sandboxes, running copies of this one (memory, processes, files,
        network policy), each counted in the tenant's quotas."""
        svc = _service(request)
        return SandboxList(sandboxes=[_with_facts(svc, i) for i in await svc.library.fork(
            tenant, sandbox_id, body.n, ttl=body.timeout)])

    # ------------------------------------------------------------------ pools

    @app.post("/v1/pools", status_code=201, response_model=PoolInfo, tags=["pools"],
              responses=_pick(400, 401, 404, 409, 422, 429))
    async def create_pool(request: Request, tenant: Tenant, body: CreatePoolRequest
                          ) -> PoolInfo:
        """Keep ``min_size`` sandboxes restored from one of the tenant's snapshots,
        waiting for ``POST /v1/sandboxes {"pool": name}``. The pool is kept across
        server restarts; its memory (``max_size`` sandboxes) counts in the quota."""
        return await _service(request).library.create_pool(
            tenant, body.name, snapshot=body.snapshot, min_size=body.min_size,
            max_size=body.max_size, idle_timeout=body.idle_timeout,
            network=_policy(body.network))

    @app.get("/v1/pools", response_model=PoolList, tags=["pools"], responses=_pick(401))
    async def list_pools(request: Request, tenant: Tenant) -> PoolList:
        return PoolList(pools=_service(request).library.list_pools(tenant))

    @app.get("/v1/pools/{name}", response_model=PoolInfo, tags=["pools"],
             responses=_pick(400, 401, 404))
    async def get_pool(request: Request, tenant: Tenant, name: PoolRef) -> PoolInfo:
        return _service(request).library.pool_info(tenant, name)

    @app.delete("/v1/pools/{name}", status_code=204, response_class=Response,
                tags=["pools"], responses=_pick(400, 401, 404))
    async def delete_pool(request: Request, tenant: Tenant, name: PoolRef) -> Response:
        """Stop the pool and kill its waiting sandboxes (handed-out ones go on)."""
        await _service(request).library.delete_pool(tenant, name)
        return Response(status_code=204)

    # ------------------------------------------------------------------ commands

    @app.post("/v1/sandboxes/{sandbox_id}/commands", response_class=NDJSONResponse,
              tags=["commands"], responses={
                  200: {"model": CommandEvent, "description": "One JSON object per line:"
                        " output chunks as they come, then one `exit` or `error`."},
                  **_pick(400, 401, 404, 409, 413, 422)})
    async def run_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          body: RunCommandRequest) -> NDJSONResponse:
        """Run a command; its output streams back as NDJSON while it runs. Closing the
        connection kills the command."""
        events = await _service(request).run_command(
            tenant, sandbox_id, cmd=body.cmd, env=body.env, cwd=body.cwd, user=body.user,
            timeout=body.timeout, stdin=_stdin(body))
        return _ndjson_response(events)

    @app.post("/v1/sandboxes/{sandbox_id}/commands/start", status_code=201,
              response_model=CommandInfo, tags=["commands"],
              responses=_pick(400, 401, 404, 409, 413, 422, 429))
    async def start_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                            body: RunCommandRequest) -> CommandInfo:
        """Start a command in the background and return at once: follow its output
        with GET .../commands/{command_id}/output. Without ``stdin``, its stdin stays
        open for POST .../stdin."""
        return await _service(request).start_command(
            tenant, sandbox_id, cmd=body.cmd, env=body.env, cwd=body.cwd, user=body.user,
            timeout=body.timeout, stdin=_stdin(body))

    @app.get("/v1/sandboxes/{sandbox_id}/commands", response_model=CommandList,
             tags=["commands"], responses=_pick(401, 404, 409))
    async def list_commands(request: Request, tenant: Tenant, sandbox_id: SandboxId
                            ) -> CommandList:
        """The sandbox's background commands (running, and the latest that ended)."""
        return CommandList(commands=_service(request).list_commands(tenant, sandbox_id))

    @app.get("/v1/sandboxes/{sandbox_id}/stats", response_model=CommandStats,
             tags=["commands"], responses=_pick(400, 401, 404, 409, 422))
    async def command_stats(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                            pid: Annotated[int, Query(ge=1, le=1 << 22, description="A"
                                                      " command's pid (its handle's).")]
                            ) -> CommandStats:
        """CPU time, memory and processes of the running command ``pid``."""
        st = await _service(request).on_sandbox(tenant, sandbox_id,
                                                lambda sb: sb.commands.stats(pid))
        return CommandStats(running=st.running, cpu_usec=st.cpu_usec,
                            memory_bytes=st.memory_bytes, processes=st.processes)

    @app.get("/v1/sandboxes/{sandbox_id}/commands/{command_id}", response_model=CommandInfo,
             tags=["commands"], responses=_pick(401, 404, 409))
    async def get_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          command_id: CommandId) -> CommandInfo:
        """A background command's state (and exit, once it ended)."""
        return _service(request).command_info(tenant, sandbox_id, command_id)

    @app.get("/v1/sandboxes/{sandbox_id}/commands/{command_id}/output",
             response_class=NDJSONResponse, tags=["commands"], responses={
                 200: {"model": CommandEvent, "description": "One JSON object per line,"
                       " each with its `seq`: output chunks, then one `exit` or `error`."},
                 **_pick(401, 404, 409, 422)})
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
        events = _service(request).command_output(tenant, sandbox_id, command_id,
                                                  offset=offset, follow=follow)
        return _ndjson_response(events)

    @app.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin", status_code=204,
              response_class=Response, tags=["commands"],
              responses=_pick(401, 404, 409, 413),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string",
                                                          "format": "binary"}}}}})
    async def command_stdin(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                            command_id: CommandId) -> Response:
        """Write the request body (raw bytes, at most the JSON body cap) to the
        command's stdin."""
        await _service(request).send_stdin(tenant, sandbox_id, command_id,
                                           await request.body())
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin/close",
              status_code=204, response_class=Response, tags=["commands"],
              responses=_pick(401, 404, 409))
    async def close_command_stdin(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                                  command_id: CommandId) -> Response:
        """End the command's stdin (EOF); a no-op once closed or ended."""
        await _service(request).close_stdin(tenant, sandbox_id, command_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/commands/{command_id}/signal", status_code=204,
              response_class=Response, tags=["commands"],
              responses=_pick(400, 401, 404, 409, 422))
    async def signal_command(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                             command_id: CommandId, body: SignalRequest) -> Response:
        """Signal the command's process group (SIGINT interrupts, SIGTERM terminates,
        SIGKILL kills); a no-op once it ended."""
        await _service(request).signal_command(tenant, sandbox_id, command_id,
                                               signal=body.signal, grace=body.grace)
        return Response(status_code=204)

    # ------------------------------------------------------------------ files

    @app.put("/v1/sandboxes/{sandbox_id}/files", response_model=WriteResult, tags=["files"],
             responses=_pick(400, 401, 403, 404, 409, 413),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
    async def upload_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          path: GuestPath, mode: Annotated[int, Query(
                              ge=0, le=0o7777, description="Permission bits.")] = 0o644,
                          make_parents: Annotated[bool, Query(
                              description="Create missing parent directories.")] = True
                          ) -> WriteResult:
        """Write the request body to ``path`` (streamed; atomic: whole or not at all)."""
        length = request.headers.get("content-length")
        return await _service(request).upload(
            tenant, sandbox_id, path, request.stream(),
            length=int(length) if length and length.isdigit() else None, mode=mode,
            make_parents=make_parents)

    @app.get("/v1/sandboxes/{sandbox_id}/files", response_class=OctetStreamResponse,
             tags=["files"], responses={
                 200: {"content": {"application/octet-stream": {
                     "schema": {"type": "string", "format": "binary"}}},
                     "description": "The file's bytes."},
                 **_pick(400, 401, 404, 409, 413)})
    async def download_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                            path: GuestPath, max_bytes: Annotated[int | None, Query(
                                ge=0, description="Refuse (413) a larger file.")] = None
                            ) -> OctetStreamResponse:
        """The file's bytes, streamed (chunked: a body cut short means the read failed
        part-way)."""
        chunks = await _service(request).download(tenant, sandbox_id, path,
                                                  max_bytes=max_bytes)
        return OctetStreamResponse(chunks, headers={"Cache-Control": "no-store"})

    @app.get("/v1/sandboxes/{sandbox_id}/files/list", response_model=EntryList,
             tags=["files"], responses=_pick(400, 401, 403, 404, 409, 422))
    async def list_files(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                         path: GuestPath, depth: Annotated[int, Query(
                             ge=1, le=MAX_LIST_DEPTH, description="Levels listed.")] = 1
                         ) -> EntryList:
        """The entries under a directory, sorted by name (``depth`` levels)."""
        entries = await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.list(path, depth=depth))
        return EntryList(entries=[_entry(e) for e in entries])

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=EntryInfo,
             tags=["files"], responses=_pick(400, 401, 403, 404, 409, 422))
    async def stat_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        path: GuestPath) -> EntryInfo:
        """The entry at ``path`` (a symlink itself, not its target)."""
        return _entry(await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.stat(path)))

    @app.get("/v1/sandboxes/{sandbox_id}/files/exists", response_model=Exists,
             tags=["files"], responses=_pick(400, 401, 404, 409, 422))
    async def file_exists(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          path: GuestPath) -> Exists:
        """Whether anything exists at ``path``."""
        return Exists(exists=await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.exists(path)))

    @app.post("/v1/sandboxes/{sandbox_id}/files/dir", response_model=MadeDir,
              tags=["files"], responses=_pick(400, 401, 403, 404, 409, 422))
    async def make_dir(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                       body: MakeDirRequest) -> MadeDir:
        """Create a directory and its parents (``created`` false: it existed)."""
        return MadeDir(created=await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.make_dir(body.path, mode=body.mode)))

    @app.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, response_class=Response,
                tags=["files"], responses=_pick(400, 401, 403, 404, 409, 422))
    async def remove_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          path: GuestPath, recursive: Annotated[bool, Query(
                              description="Remove a directory with what it holds.")] = True
                          ) -> Response:
        """Remove a file, a symlink or a directory."""
        await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.remove(path, recursive=recursive))
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/files/rename", response_model=EntryInfo,
              tags=["files"], responses=_pick(400, 401, 403, 404, 409, 422))
    async def rename_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          body: RenameRequest) -> EntryInfo:
        """Move ``old_path`` to ``new_path``; returns the entry at its new path."""
        return _entry(await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.rename(body.old_path, body.new_path,
                                                           overwrite=body.overwrite)))

    @app.post("/v1/sandboxes/{sandbox_id}/files/chown", status_code=204,
              response_class=Response, tags=["files"],
              responses=_pick(400, 401, 403, 404, 409, 422))
    async def chown_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                         body: ChownRequest) -> Response:
        """Give ``path`` to ``user`` (and set its ``mode`` if given); a symlink is
        refused, not followed."""
        await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.chown(body.path, user=body.user,
                                                          mode=body.mode))
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/files/tmpfs", status_code=204,
              response_class=Response, tags=["files"],
              responses=_pick(400, 401, 403, 404, 409, 422))
    async def mount_tmpfs(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          body: TmpfsRequest) -> Response:
        """Mount a private tmpfs at ``path`` (memory only: never on a disk or in a
        snapshot's disk layer; nosuid, nodev, noexec; at most ``size_bytes``)."""
        await _service(request).on_sandbox(
            tenant, sandbox_id, lambda sb: sb.files.mount_tmpfs(
                body.path, mode=body.mode, user=body.user, size_bytes=body.size_bytes))
        return Response(status_code=204)

    @app.put("/v1/sandboxes/{sandbox_id}/files/tree", response_model=DirTransfer,
             tags=["files"], responses=_pick(400, 401, 403, 404, 409, 413, 422),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_tree(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          path: GuestPath) -> DirTransfer:
        """Extract the request body, a tar stream, into the guest directory ``path``
        (created if missing; streamed, capped like file uploads). The guest refuses
        absolute or escaping paths and links leading out: those are skipped and named."""
        length = request.headers.get("content-length")
        return _transfer(await _service(request).upload_tree(
            tenant, sandbox_id, path, request.stream(),
            length=int(length) if length and length.isdigit() else None))

    @app.get("/v1/sandboxes/{sandbox_id}/files/tree", response_class=NDJSONResponse,
             tags=["files"], responses={
                 200: {"model": TreeEvent, "description": "One JSON object per line: the"
                       " tree as a tar stream (PAX) in `data` pieces, then one `end` or"
                       " `error`."},
                 **_pick(400, 401, 403, 404, 409, 413, 422)})
    async def download_tree(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                            path: GuestPath,
                            max_bytes: Annotated[int | None, Query(
                                ge=1, description="Refuse (413) more file content.")] = None,
                            max_files: Annotated[int | None, Query(
                                ge=1, le=1 << 24, description="Refuse (413) more"
                                " entries.")] = None) -> NDJSONResponse:
        """The guest directory ``path`` as a tar stream, in NDJSON pieces. Extract it as
        hostile input: it comes from the guest (the SDK's ``download_dir`` does)."""
        events = await _service(request).download_tree(tenant, sandbox_id, path,
                                                       max_bytes=max_bytes,
                                                       max_files=max_files)
        return _ndjson_response(events)

    # ------------------------------------------------------------------ ports, network

    @app.post("/v1/sandboxes/{sandbox_id}/ports", status_code=201, response_model=PortInfo,
              tags=["ports"], responses=_pick(400, 401, 404, 409, 422, 429))
    async def expose_port(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          body: ExposePortRequest) -> PortInfo:
        """Listen on the server's host (its ``--port-host``, 127.0.0.1 by default; a free
        host port) and tunnel every connection to guest port ``port``. Exposing a port
        again returns its listener. Listeners end with the sandbox or DELETE; a server
        restart re-opens them (on the same host port if it is free)."""
        return await _service(request).networking.expose(
            tenant, sandbox_id, body.port, request_host=request.headers.get("host"))

    @app.get("/v1/sandboxes/{sandbox_id}/ports", response_model=PortList, tags=["ports"],
             responses=_pick(401, 404, 409))
    async def list_ports(request: Request, tenant: Tenant, sandbox_id: SandboxId
                         ) -> PortList:
        """The sandbox's exposed ports, by guest port."""
        return PortList(ports=await _service(request).networking.list_ports(
            tenant, sandbox_id, request_host=request.headers.get("host")))

    @app.delete("/v1/sandboxes/{sandbox_id}/ports/{port}", response_model=ClosedPorts,
                tags=["ports"], responses=_pick(401, 404, 409, 422))
    async def close_port(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                         port: GuestPort) -> ClosedPorts:
        """Stop exposing the guest port (its open connections are reset); ``closed`` is 0
        if it was not exposed."""
        return ClosedPorts(closed=await _service(request).networking.close(
            tenant, sandbox_id, port))

    @app.post("/v1/sandboxes/{sandbox_id}/ports/{port}/wait", status_code=204,
              response_class=Response, tags=["ports"],
              responses=_pick(400, 401, 404, 409, 422, 504))
    async def wait_port(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        port: GuestPort, body: WaitPortRequest) -> Response:
        """Return (204) once a server in the guest listens on the port (on 127.0.0.1,
        0.0.0.0 or ::); 504 (port_timeout) after ``timeout`` seconds."""
        await _service(request).networking.wait(tenant, sandbox_id, port,
                                                timeout=body.timeout)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/network", response_model=NetworkInfo,
             tags=["network"], responses=_pick(401, 404, 409))
    async def get_network(request: Request, tenant: Tenant, sandbox_id: SandboxId
                          ) -> NetworkInfo:
        """The sandbox's egress policy (null: no egress) and its byte count."""
        return await _service(request).networking.network(tenant, sandbox_id)

    @app.put("/v1/sandboxes/{sandbox_id}/network", response_model=NetworkInfo,
             tags=["network"], responses=_pick(400, 401, 404, 409, 422))
    async def set_network(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                          body: NetworkPolicyBody) -> NetworkInfo:
        """Replace the egress policy at once (open connections it refuses are closed).
        On a sandbox created without network this starts its egress, as locally:
        commands started afterwards get the proxy variables."""
        policy = _policy(body)
        assert policy is not None
        return await _service(request).networking.set_policy(tenant, sandbox_id, policy)

    @app.get("/v1/sandboxes/{sandbox_id}/network/events", response_model=EgressEventList,
             tags=["network"], responses=_pick(401, 404, 409, 422))
    async def network_events(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                             limit: Annotated[int, Query(
                                 ge=1, le=1000, description="The latest this many.")] = 100
                             ) -> EgressEventList:
        """The egress proxy's latest decisions (allow, deny, error, close), oldest first
        (none without egress)."""
        return EgressEventList(events=await _service(request).networking.events(
            tenant, sandbox_id, limit=limit))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _tidy(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _tidy(doc: dict[str, Any]) -> dict[str, Any]:
    """Error responses are JSON whatever the route's success type; streamed bodies
    name only their own schema."""
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    _rate_limit_responses(doc)
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            for status, resp in op.get("responses", {}).items():
                content = resp.get("content")
                if status.isdigit() and int(status) >= 400:
                    resp["content"] = {"application/json": {"schema": error_ref}}
                elif content and "application/x-ndjson" in content:
                    schema = content["application/x-ndjson"].get("schema", {})
                    schema.pop("type", None)
    schemas = doc.get("components", {}).get("schemas", {})
    _json_schema_bounds(schemas)
    text = json.dumps(doc["paths"])
    for name in ("HTTPValidationError", "ValidationError"):  # 422s are ErrorBody here
        if f"#/components/schemas/{name}" not in text:
            schemas.pop(name, None)
    return doc


def _rate_limit_responses(doc: dict[str, Any]) -> None:
    """Every authenticated operation can be rate limited: each gets a 429, and every
    429 names its Retry-After header (sent with code rate_limited)."""
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            responses = op.get("responses", {})
            if "401" in responses and "429" not in responses:
                responses["429"] = {"description": _ERRORS[429]["description"]}
            if "429" in responses:
                responses["429"]["headers"] = {"Retry-After": {
                    "description": "Whole seconds to wait (with code rate_limited).",
                    "schema": {"type": "integer", "minimum": 1}}}


def _ndjson_response(events: AsyncIterator[dict[str, Any]]) -> NDJSONResponse:
    """A command's events as an NDJSON body, sent as they come and never cached."""
    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            yield ndjson(event)

    return NDJSONResponse(lines(), headers={"Cache-Control": "no-store",
                                            "X-Content-Type-Options": "nosniff"})


def _policy(body: NetworkPolicyBody | None) -> NetworkPolicy | None:
    if body is None:
        return None
    return NetworkPolicy(allow=tuple(body.allow), ports=tuple(body.ports),
                         allow_http=body.allow_http, max_bytes=body.max_bytes)


def _with_facts(svc: SandboxService, info: SandboxInfo) -> SandboxInfo:
    """``info`` with what the server knows of the sandbox's VM (accelerator, boot
    seconds, guest kernel, agent version)."""
    return info.model_copy(update=svc.vm_facts(info.sandbox_id))


def _entry(e: LocalEntryInfo) -> EntryInfo:
    return EntryInfo(path=e.path, name=e.name, type=e.type,  # type: ignore[arg-type]
                     size=e.size, mode=e.mode, mtime=e.mtime, uid=e.uid, gid=e.gid,
                     target=e.target)


def _transfer(t: LocalDirTransfer) -> DirTransfer:
    return DirTransfer(files=t.files, dirs=t.dirs, symlinks=t.symlinks, bytes=t.bytes,
                       skipped=list(t.skipped))


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


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum",
           "lt": "exclusiveMaximum"}


def _json_schema_bounds(node: object) -> None:
    """Bounds of numbers nested in lists and unions come out of FastAPI as pydantic's
    ``ge``/``le`` (no JSON Schema keywords: clients and schemathesis ignored them);
    write them as ``minimum``/``maximum``."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            for short, long in _BOUNDS.items():
                if short in node:
                    node.setdefault(long, node.pop(short))
        for v in node.values():
            _json_schema_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _json_schema_bounds(v)


def _pick(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: _ERRORS[s] for s in statuses}


def openapi_document(app: FastAPI | None = None) -> str:
    """The OpenAPI document as committed in docs/openapi.json (sorted, indented)."""
    doc = (app or create_app()).openapi()
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
