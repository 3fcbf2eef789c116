"""The remote SDK's snapshots and warm pools (the server keeps them, per tenant).

Twins of the local ``SnapshotStore`` and ``Pool``::

    snap = sb.snapshot("ready")                          # a snapshot of the tenant's
    copy = Sandbox.from_snapshot("ready")                # a new sandbox restored from it
    with Pool.create(name="web", snapshot="ready", min_size=2) as pool:
        with pool.acquire() as sb:                       # restored and waiting: fast
            sb.commands.run("true")

A pool made by ``Pool.create`` is deleted when its ``with`` block ends (or by
``delete``); one reached by ``Pool.connect`` is only let go of (``close``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from sandvm import _portal
from sandvm.client._async import CREATE_TIMEOUT, AsyncSandbox, SandboxInfo
from sandvm.client._http import ServerApi, policy_body
from sandvm.dto import PoolInfo, SnapshotInfo
from sandvm.egress_policy import NetworkPolicy
from sandvm.errors import ServiceError

__all__ = ["AsyncPool", "AsyncSnapshotStore", "Pool", "PoolInfo", "SnapshotInfo",
           "SnapshotStore"]


def _items(res: object, key: str) -> list[Any]:
    items = res.get(key) if isinstance(res, dict) else None
    if not isinstance(items, list):
        raise ServiceError(f"the server sent a malformed {key} list")
    return items


class AsyncSnapshotStore:
    """The tenant's snapshots on the server: ``list``, ``get``, ``remove``. Take one
    with ``AsyncSandbox.snapshot``; restore one with ``AsyncSandbox.from_snapshot``."""

    def __init__(self, *, api_key: str | None = None, url: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._api = ServerApi(api_key=api_key, url=url, transport=transport)

    async def list(self) -> list[SnapshotInfo]:
        return [SnapshotInfo.from_json(i)
                for i in _items(await self._api.call("GET", "/v1/snapshots"), "snapshots")]

    async def get(self, name: str) -> SnapshotInfo:
        """Raises SnapshotNotFound."""
        return SnapshotInfo.from_json(await self._api.call(
            "GET", f"/v1/snapshots/{quote(name, safe='')}"))

    async def remove(self, name: str) -> None:
        """Delete a snapshot; sandboxes restored from it keep running. Raises
        SnapshotNotFound, SnapshotInUse (a pool restores from it)."""
        await self._api.call("DELETE", f"/v1/snapshots/{quote(name, safe='')}")

    async def aclose(self) -> None:
        await self._api.aclose()


class AsyncPool:
    """A warm pool on the server: sandboxes restored from a snapshot, waiting.
    ``await AsyncPool.create(...)`` or ``await AsyncPool.connect(name)``."""

    def __init__(self, *, api: ServerApi, info: PoolInfo, owned: bool) -> None:
        self._api = api
        self.name = info.name
        self._owned = owned

    def _path(self) -> str:
        return f"/v1/pools/{quote(self.name, safe='')}"

    @classmethod
    async def create(cls, *, name: str, snapshot: str, min_size: int = 1, max_size: int = 4,
                     idle_timeout: float | None = 300.0,
                     network: NetworkPolicy | None = None, api_key: str | None = None,
                     url: str | None = None,
                     transport: httpx.AsyncBaseTransport | None = None) -> AsyncPool:
        """Start a pool of the tenant restoring its ``snapshot`` (kept by the server
        until deleted, across restarts). Raises PoolExists, SnapshotNotFound,
        QuotaExceeded, InvalidSpec."""
        body: dict[str, Any] = {"name": name, "snapshot": snapshot, "min_size": min_size,
                                "max_size": max_size, "idle_timeout": idle_timeout}
        if network is not None:
            body["network"] = policy_body(network)
        api = ServerApi(api_key=api_key, url=url, transport=transport)
        try:
            info = PoolInfo.from_json(await api.call("POST", "/v1/pools", json=body))
        except BaseException:
            await api.aclose()
            raise
        return cls(api=api, info=info, owned=True)

    @classmethod
    async def connect(cls, name: str, *, api_key: str | None = None, url: str | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> AsyncPool:
        """An existing pool of the tenant. Raises PoolNotFound."""
        api = ServerApi(api_key=api_key, url=url, transport=transport)
        try:
            info = PoolInfo.from_json(await api.call(
                "GET", f"/v1/pools/{quote(name, safe='')}"))
        except BaseException:
            await api.aclose()
            raise
        return cls(api=api, info=info, owned=False)

    @classmethod
    async def list(cls, *, api_key: str | None = None, url: str | None = None,
                   transport: httpx.AsyncBaseTransport | None = None) -> list[PoolInfo]:
        """The tenant's pools."""
        api = ServerApi(api_key=api_key, url=url, transport=transport)
        try:
            return [PoolInfo.from_json(i)
                    for i in _items(await api.call("GET", "/v1/pools"), "pools")]
        finally:
            await api.aclose()

    async def acquire(self, *, timeout: float | None = 30.0,
                      ttl: float | None = None) -> AsyncSandbox:
        """A sandbox from the pool, the tenant's from now on (``kill`` it when done).
        As locally, ``timeout`` is how long to wait for one to be ready (None: the
        server's cap, 60 s by default); ``ttl`` is its lifetime (default the server's).
        Raises PoolExhausted (none became ready in time), PoolNotFound, QuotaExceeded."""
        body: dict[str, Any] = {"pool": self.name}
        if timeout is not None:
            body["wait"] = timeout
        if ttl is not None:
            body["timeout"] = ttl
        info = SandboxInfo.from_json(await self._api.call(
            "POST", "/v1/sandboxes", json=body,
            timeout=httpx.Timeout(60.0, connect=10.0, read=CREATE_TIMEOUT)))
        return AsyncSandbox(api=self._api.sibling(), info=info)

    @contextlib.asynccontextmanager
    async def sandbox(self, *, timeout: float | None = 30.0,
                      ttl: float | None = None) -> AsyncIterator[AsyncSandbox]:
        """``async with pool.sandbox() as sb:`` acquire, then kill."""
        sb = await self.acquire(timeout=timeout, ttl=ttl)
        try:
            yield sb
        finally:
            await sb.kill()

    async def stats(self) -> PoolInfo:
        """Its settings and counters now. Raises PoolNotFound."""
        return PoolInfo.from_json(await self._api.call("GET", self._path()))

    async def delete(self) -> None:
        """Stop the pool on the server and kill its waiting sandboxes (ones handed out
        go on). Raises PoolNotFound."""
        try:
            await self._api.call("DELETE", self._path())
        finally:
            await self._api.aclose()

    async def close(self) -> None:
        """Close the connection; the pool stays on the server."""
        await self._api.aclose()

    async def __aenter__(self) -> AsyncPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Delete a pool this object created; only let go of a connected one."""
        if self._owned:
            await self.delete()
        else:
            await self.close()


class SnapshotStore:
    """Sync twin of AsyncSnapshotStore."""

    def __init__(self, *, api_key: str | None = None, url: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._a = AsyncSnapshotStore(api_key=api_key, url=url, transport=transport)

    def list(self) -> list[SnapshotInfo]:
        return _portal.call(self._a.list())

    def get(self, name: str) -> SnapshotInfo:
        return _portal.call(self._a.get(name))

    def remove(self, name: str) -> None:
        _portal.call(self._a.remove(name))

    def close(self) -> None:
        _portal.call(self._a.aclose())


class Pool:
    """Sync twin of AsyncPool: ``with Pool.create(...) as pool, pool.acquire() as sb:``."""

    def __init__(self, inner: AsyncPool) -> None:
        self._a = inner
        self.name = inner.name

    @classmethod
    def create(cls, *, name: str, snapshot: str, min_size: int = 1, max_size: int = 4,
               idle_timeout: float | None = 300.0, network: NetworkPolicy | None = None,
               api_key: str | None = None, url: str | None = None,
               transport: httpx.AsyncBaseTransport | None = None) -> Pool:
        """See AsyncPool.create."""
        return cls(_portal.call(AsyncPool.create(
            name=name, snapshot=snapshot, min_size=min_size, max_size=max_size,
            idle_timeout=idle_timeout, network=network, api_key=api_key, url=url,
            transport=transport)))

    @classmethod
    def connect(cls, name: str, *, api_key: str | None = None, url: str | None = None,
                transport: httpx.AsyncBaseTransport | None = None) -> Pool:
        """See AsyncPool.connect."""
        return cls(_portal.call(AsyncPool.connect(name, api_key=api_key, url=url,
                                                  transport=transport)))

    @classmethod
    def list(cls, *, api_key: str | None = None, url: str | None = None,
             transport: httpx.AsyncBaseTransport | None = None) -> list[PoolInfo]:
        return _portal.call(AsyncPool.list(api_key=api_key, url=url, transport=transport))

    @contextlib.contextmanager
    def acquire(self, *, timeout: float | None = 30.0,
                ttl: float | None = None) -> Iterator[Any]:
        """A sandbox from the pool for the ``with`` block (a ``sandvm.client.Sandbox``),
        killed afterwards; see AsyncPool.acquire. Raises PoolExhausted."""
        from sandvm.client._sync import Sandbox

        sb = Sandbox(_portal.call(self._a.acquire(timeout=timeout, ttl=ttl)))
        try:
            yield sb
        finally:
            sb.kill()

    def stats(self) -> PoolInfo:
        return _portal.call(self._a.stats())

    def delete(self) -> None:
        _portal.call(self._a.delete())

    def close(self) -> None:
        _portal.call(self._a.close())

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        _portal.call(self._a.__aexit__(*exc))
