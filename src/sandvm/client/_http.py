"""The remote SDK's HTTP side, below its namespaces: the server's address and key, one
connection pool per sandbox or store, error responses mapped back to sandvm's errors,
and what a namespace of a sandbox needs to call the server (``SandboxCalls``)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx

from sandvm.egress_policy import NetworkPolicy
from sandvm.errors import (
    InvalidSpec,
    RateLimited,
    ServerUnreachable,
    ServiceError,
    Unauthenticated,
    error_from_dict,
)

__all__ = ["DEFAULT_URL", "SandboxCalls", "ServerApi", "chunk_of", "event_of", "ndjson_lines",
           "policy_body"]

DEFAULT_URL = "http://127.0.0.1:7070"
MAX_ERROR_BODY = 64 << 10
MAX_LINE = 8 << 20  # one NDJSON event; the server sends far less


def policy_body(network: NetworkPolicy) -> dict[str, Any]:
    """The API's network policy object (for the SDK's create, pools and set_policy).
    Raises InvalidSpec for fields clients may not set (``allow_ips``, ``hosts``: the
    server operator's)."""
    if not isinstance(network, NetworkPolicy):
        raise InvalidSpec("network must be a sandvm.NetworkPolicy or None")
    if network.allow_ips or network.hosts:
        raise InvalidSpec("allow_ips and hosts are set by the server's operator, not"
                          " by API clients")
    return {"allow": list(network.allow), "ports": list(network.ports),
            "allow_http": network.allow_http, "max_bytes": network.max_bytes}


def _settings(api_key: str | None, url: str | None) -> tuple[str, str]:
    key = api_key if api_key is not None else os.environ.get("SANDVM_API_KEY")
    if not key:
        raise Unauthenticated("no API key: pass api_key=... or set SANDVM_API_KEY (create"
                              " one on the server with `sandvm key create NAME`)")
    base = url if url is not None else os.environ.get("SANDVM_URL") or DEFAULT_URL
    if not base.startswith(("http://", "https://")):
        raise InvalidSpec(f"server URL {base!r} must start with http:// or https://")
    return key, base.rstrip("/")


class ServerApi:
    """The remote SDK's HTTP side (for its modules; not part of the user surface): one
    connection pool, the key, the mapping of error responses to sandvm's errors."""

    def __init__(self, *, api_key: str | None, url: str | None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._key, self.url = _settings(api_key, url)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The connection pool (made again after ``aclose``)."""
        if self._client is None or self._client.is_closed:
            from sandvm.version import __version__

            self._client = httpx.AsyncClient(
                base_url=self.url, transport=self._transport,
                headers={"Authorization": f"Bearer {self._key}",
                         "User-Agent": f"sandvm-client/{__version__}"},
                timeout=httpx.Timeout(60.0, connect=10.0))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def sibling(self) -> ServerApi:
        """Another connection pool to the same server with the same key."""
        api = ServerApi.__new__(ServerApi)
        api._key, api.url, api._transport, api._client = (self._key, self.url,
                                                          self._transport, None)
        return api

    async def _raise_for(self, resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        body = b""
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > MAX_ERROR_BODY:
                break
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("code"), str)):
            raise ServiceError(f"HTTP {resp.status_code} from {self.url}:"
                               f" {body[:200].decode(errors='replace')}")
        exc = error_from_dict(obj)
        if isinstance(exc, RateLimited):  # no retry here: the caller decides, told how long
            exc.retry_after = _retry_after(resp.headers.get("retry-after"))
        raise exc

    @asynccontextmanager
    async def stream(self, method: str, path: str, **kw: Any) -> AsyncIterator[httpx.Response]:
        """A response whose body is read as it arrives; error statuses raised."""
        try:
            async with self.client.stream(method, path, **kw) as resp:
                await self._raise_for(resp)
                yield resp
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{method} {self.url}{path}: {type(exc).__name__}:"
                                    f" {exc}") from exc

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """A JSON request; returns the decoded body (None for 204)."""
        async with self.stream(method, path, **kw) as resp:
            if resp.status_code == 204:
                return None
            try:
                body = await resp.aread()
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"{method} {self.url}{path}: {exc}") from exc
        try:
            return json.loads(body)
        except ValueError:
            raise ServiceError(f"the server sent a body that is not JSON for {method}"
                               f" {path}") from None


def _retry_after(value: str | None) -> float | None:
    """The seconds of a ``Retry-After`` header (delta-seconds; None if absent or an
    HTTP date, which sandvm's server never sends)."""
    try:
        secs = float(value) if value is not None else None
    except ValueError:
        return None
    return secs if secs is not None and 0 <= secs < 1e9 else None


class SandboxCalls:
    """A remote sandbox's HTTP side, for its namespaces (ports, network): the server's API
    helper, URLs under the sandbox's, and the check that refuses calls once the sandbox
    was killed through this client."""

    def __init__(self, api: ServerApi, sandbox_id: str, check_open: Callable[[], None]
                 ) -> None:
        self.api = api
        self.sandbox_id = sandbox_id
        self.check_open = check_open

    def path(self, suffix: str = "") -> str:
        """The API path of the sandbox, then ``suffix``."""
        return f"/v1/sandboxes/{quote(self.sandbox_id, safe='')}{suffix}"


async def ndjson_lines(resp: httpx.Response) -> AsyncIterator[bytes]:
    """NDJSON lines of a streamed response (each capped)."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1:]
            if line.strip():
                yield line
        if len(buf) > MAX_LINE:
            raise ServiceError("the server sent an output line over the client's cap")
    if buf.strip():
        yield buf


def chunk_of(event: dict[str, Any]) -> bytes:
    text, b64 = event.get("text"), event.get("b64")
    if isinstance(text, str):
        return text.encode()
    if isinstance(b64, str):
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise ServiceError("the server sent a malformed output event")


def event_of(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        raise ServiceError("the server sent a line that is not JSON") from None
    if not isinstance(event, dict):
        raise ServiceError("the server sent an event that is not an object")
    return event
