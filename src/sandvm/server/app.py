"""The HTTP API's application: the guard in front of the routes, the error handlers, the
OpenAPI document. The routes themselves, which parse a request and call the service and
nothing more, are grouped by resource in ``sandvm.server.routes``.

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

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandvm.errors import InvalidSpec, RequestTooLarge, SandvmError, Unauthenticated
from sandvm.providers.base import SandboxProvider
from sandvm.server.config import ServerConfig
from sandvm.server.ratelimit import limiter_for, retry_after_seconds
from sandvm.server.redact import (
    Redactor,
    default_redactor,
    escape_text,
    new_request_id,
    request_id,
    status_for,
)
from sandvm.server.routes import ROUTERS
from sandvm.server.routes.common import ERRORS
from sandvm.server.service import SandboxService

log = logging.getLogger("sandvm.server")

PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})
MAX_HEADERS = 100
_UPLOAD_RE = re.compile(r"/v1/sandboxes/[^/]+/files(?:/tree)?")  # streamed bodies


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
            for r in _routes(self.fastapi):
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


def _routes(app: FastAPI) -> list[Route]:
    """Every route of ``app``, those of the included routers (``ROUTERS``) one by one
    (FastAPI keeps an included router as one entry of ``app.router.routes``)."""
    return [r for r in (*app.router.routes, *(r for rt in ROUTERS for r in rt.routes))
            if isinstance(r, Route)]


def create_app(config: ServerConfig | None = None, *,
               service: SandboxService | None = None,
               provider: SandboxProvider | None = None) -> FastAPI:
    """The sandvm HTTP API. The service (``SandboxService(config, provider=provider)``
    unless given: ``provider`` None runs sandboxes on QEMU, ``InMemoryVmProvider()``
    on the in-memory fake, for API-level tests) is started when the app starts and
    stopped (its sandboxes detached) when it stops."""
    from sandvm.version import __version__

    cfg = config or (service.config if service is not None else ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or SandboxService(cfg, provider=provider)
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
            matches = [r for r in _routes(app) if r.methods
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

    for router in ROUTERS:  # in order: the order routes are matched in
        app.include_router(router)

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
    _unsupported_responses(doc)
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
                responses["429"] = {"description": ERRORS[429]["description"]}
            if "429" in responses:
                responses["429"]["headers"] = {"Retry-After": {
                    "description": "Whole seconds to wait (with code rate_limited).",
                    "schema": {"type": "integer", "minimum": 1}}}


def _unsupported_responses(doc: dict[str, Any]) -> None:
    """What a sandbox's or pool's operation answers when the server's provider cannot
    do it (a server on the in-memory fake, `sandvm serve --provider memory`)."""
    for path, ops in doc.get("paths", {}).items():
        if not path.startswith(("/v1/sandboxes", "/v1/pools")):
            continue
        for op in ops.values():
            responses = op.get("responses", {})
            if "401" in responses:
                responses.setdefault("501", {
                    "description": "This server's provider cannot do that (code"
                                   " unsupported: e.g. snapshots, forks or pools on a"
                                   " server run with --provider memory)."})


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


def openapi_document(app: FastAPI | None = None) -> str:
    """The OpenAPI document as committed in docs/openapi.json (sorted, indented)."""
    doc = (app or create_app()).openapi()
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
