"""Warm pools: sandboxes restored from one snapshot, ready before anyone asks.

A pool keeps ``ready + restoring >= min_size`` (never more than ``max_size``
sandboxes in all, handed-out ones included). Restores run concurrently, one
task each: there is no single refill worker to queue behind. ``acquire`` is a
hit when a ready sandbox is waiting (no I/O: it is popped from a queue); a miss
starts a restore if there is room and waits for the next ready sandbox, up to
its timeout (PoolExhausted after). A released sandbox is destroyed, never
handed out again; its slot is refilled by a fresh restore. Ready sandboxes idle
longer than ``idle_timeout`` are trimmed down to ``min_size``. ``close`` kills
everything the pool made.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm import _portal
from sandvm.egress import NetworkPolicy
from sandvm.errors import InvalidSpec, PoolClosed, PoolExhausted, SandvmError
from sandvm.providers.qemu import QemuVmProvider
from sandvm.sandbox import AsyncSandbox, Sandbox, sandbox_vm
from sandvm.snapshots.store import Snapshot, SnapshotStore
from sandvm.values import SandboxState

__all__ = ["AsyncPool", "Pool", "PoolStats"]


@dataclass(frozen=True)
class PoolStats:
    """Counters and gauges of a pool (seed 002's VmPoolStats, plus restore times)."""

    hits: int
    misses: int
    timeouts: int
    ready: int
    in_flight: int
    in_use: int
    restored: int
    restore_failures: int
    destroyed: int
    trimmed: int
    restore_ms_p50: float | None
    restore_ms_p99: float | None
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))] * 1000, 3)


class AsyncPool:
    """A warm pool of sandboxes restored from ``snapshot``. Start it with ``await start()``
    or ``async with``. With ``network``, every sandbox it hands out has that egress
    policy (each its own proxy and audit file). ``restore`` replaces how one sandbox
    is restored (it gets the resolved snapshot; e.g. the server restores under a
    keeper, ``SandboxManager.from_snapshot``)."""

    def __init__(self, *, snapshot: Snapshot | str | Path, min_size: int = 1,
                 max_size: int = 8, idle_timeout: float | None = 300.0,
                 store: SnapshotStore | None = None,
                 provider: QemuVmProvider | None = None,
                 network: NetworkPolicy | None = None,
                 restore: Callable[[Snapshot], Awaitable[AsyncSandbox]] | None = None
                 ) -> None:
        for name, v in (("min_size", min_size), ("max_size", max_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidSpec(f"{name} must be a non-negative int, not {v!r}")
        if max_size < 1 or min_size > max_size:
            raise InvalidSpec(f"need 0 <= min_size <= max_size and max_size >= 1"
                              f" (got {min_size}, {max_size})")
        if idle_timeout is not None and idle_timeout <= 0:
            raise InvalidSpec("idle_timeout must be positive seconds or None")
        if network is not None and not isinstance(network, NetworkPolicy):
            raise InvalidSpec("network must be a NetworkPolicy or None")
        self.snapshot = snapshot
        self.network = network
        self.min_size = min_size
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self._store = store
        self._provider = provider
        self._restore = restore
        self._snap: Snapshot | None = None
        self._failing = 0  # restores failed in a row (their retries back off)
        self._ready: deque[tuple[AsyncSandbox, float]] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._in_use: set[AsyncSandbox] = set()
        self._cond: asyncio.Condition | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False
        self._started = False
        self._waiters = 0
        self._restore_times: deque[float] = deque(maxlen=1000)
        self._counts = {"hits": 0, "misses": 0, "timeouts": 0, "restored": 0,
                        "restore_failures": 0, "destroyed": 0, "trimmed": 0}
        self.last_error: SandvmError | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> AsyncPool:
        """Resolve the snapshot and begin filling to ``min_size``. Raises SnapshotNotFound,
        SnapshotCorrupt, SnapshotIncompatible."""
        if self._started:
            return self
        snap = (self._store or SnapshotStore()).resolve(self.snapshot)
        await asyncio.to_thread(SnapshotStore.verify, snap, full=False)
        self._snap = snap
        self._cond = asyncio.Condition()
        self._started = True
        self._refill()
        if self.idle_timeout is not None:
            self._janitor = asyncio.get_running_loop().create_task(self._trim_loop())
        return self

    async def __aenter__(self) -> AsyncPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop refilling and kill every sandbox the pool made (handed-out ones too)."""
        if self._closed:
            return
        self._closed = True
        if self._janitor is not None:
            self._janitor.cancel()
        for t in list(self._in_flight):
            t.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        victims = [sb for sb, _ in self._ready] + list(self._in_use)
        self._ready.clear()
        self._in_use.clear()
        self._counts["destroyed"] += len(victims)
        await asyncio.gather(*(sb.kill() for sb in victims), return_exceptions=True)
        if self._cond is not None:
            async with self._cond:
                self._cond.notify_all()

    # -- filling ---------------------------------------------------------------

    def _total(self) -> int:
        return len(self._ready) + len(self._in_flight) + len(self._in_use)

    def _refill(self) -> None:
        """Start restores until ready + restoring covers min_size plus every waiting
        acquire, within max_size."""
        if self._closed:
            return
        want = self.min_size + self._waiters
        while (len(self._ready) + len(self._in_flight) < want
               and self._total() < self.max_size):
            task = asyncio.get_running_loop().create_task(self._restore_one())
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _restore_one(self) -> None:
        t0 = time.monotonic()
        assert self._snap is not None
        try:
            if self._restore is not None:
                sb = await self._restore(self._snap)
            else:
                sb = await AsyncSandbox.from_snapshot(self._snap, store=self._store,
                                                      provider=self._provider,
                                                      network=self.network)
        except Exception as exc:  # noqa: BLE001 - any failure: counted, retried later
            self._counts["restore_failures"] += 1
            self._failing += 1
            self.last_error = exc if isinstance(exc, SandvmError) else SandvmError(
                f"{type(exc).__name__}: {exc}")
            # do not spin on a broken snapshot: 0.5 s, doubling up to a minute
            await asyncio.sleep(min(60.0, 0.5 * 2 ** min(self._failing - 1, 7)))
            task = asyncio.current_task()
            if task is not None:
                self._in_flight.discard(task)
            self._refill()  # try again for the slot
            return
        if self._closed:
            await sb.kill()
            return
        self._failing = 0
        self._restore_times.append(time.monotonic() - t0)
        self._counts["restored"] += 1
        self._ready.append((sb, time.monotonic()))
        assert self._cond is not None
        async with self._cond:
            self._cond.notify()

    # -- handing out -----------------------------------------------------------

    async def acquire(self, *, timeout: float | None = 30.0) -> AsyncSandbox:
        """A ready sandbox, yours until ``release``. Raises PoolExhausted after
        ``timeout`` seconds without one, PoolClosed."""
        if not self._started:
            await self.start()
        if self._closed:
            raise PoolClosed("the pool is closed")
        sb = self._pop_ready()
        if sb is not None:
            self._counts["hits"] += 1
            self._refill()
            return sb
        self._counts["misses"] += 1
        self._waiters += 1
        self._refill()
        assert self._cond is not None
        try:
            async with asyncio.timeout(timeout):
                async with self._cond:
                    while True:
                        if self._closed:
                            raise PoolClosed("the pool was closed while waiting")
                        sb = self._pop_ready()
                        if sb is not None:
                            return sb
                        self._refill()  # e.g. a restore failed or a ready VM died
                        await self._cond.wait()
        except TimeoutError:
            self._counts["timeouts"] += 1
            detail = f" (last restore error: {self.last_error.message})" if self.last_error else ""
            raise PoolExhausted(
                f"no sandbox became ready within {timeout} s ({len(self._in_use)} in use of"
                f" max_size={self.max_size}): release some, raise max_size or wait"
                f" longer{detail}") from None
        finally:
            self._waiters -= 1
            self._refill()

    def _pop_ready(self) -> AsyncSandbox | None:
        while self._ready:
            sb, _ = self._ready.popleft()
            if sandbox_vm(sb).failure is None and sb.state not in (SandboxState.KILLED,
                                                            SandboxState.DETACHED):
                self._in_use.add(sb)
                return sb
            self._counts["destroyed"] += 1  # died while waiting: drop it
        return None

    async def release(self, sb: AsyncSandbox) -> None:
        """Give a sandbox back: it is destroyed (never handed out again) and replaced."""
        self._in_use.discard(sb)
        await sb.kill()
        self._counts["destroyed"] += 1
        self._refill()

    def waiting(self) -> list[AsyncSandbox]:
        """The sandboxes ready and waiting now (still the pool's)."""
        return [sb for sb, _ in self._ready]

    def disown(self, sb: AsyncSandbox) -> None:
        """Hand ``sb`` over for good: the pool forgets it (``close`` will not kill it, it
        no longer counts against ``max_size``) and refills its slot."""
        self._in_use.discard(sb)
        self._refill()

    @contextlib.asynccontextmanager
    async def sandbox(self, *, timeout: float | None = 30.0) -> AsyncIterator[AsyncSandbox]:
        """``async with pool.sandbox() as sb:`` acquire, then release."""
        sb = await self.acquire(timeout=timeout)
        try:
            yield sb
        finally:
            await self.release(sb)

    # -- trimming ----------------------------------------------------------------

    async def _trim_loop(self) -> None:
        assert self.idle_timeout is not None
        period = min(max(self.idle_timeout / 2, 0.05), 5.0)
        while not self._closed:
            await asyncio.sleep(period)
            await self.trim()

    async def trim(self) -> int:
        """Destroy ready sandboxes idle past ``idle_timeout``, keeping ``min_size``."""
        if self.idle_timeout is None:
            return 0
        now = time.monotonic()
        victims = []
        while (len(self._ready) > self.min_size
               and now - self._ready[0][1] > self.idle_timeout):
            victims.append(self._ready.popleft()[0])
        # counted as they leave ``ready`` so stats() never shows a sandbox in neither
        # (a reader between the pop and the kills' end saw ready drop, trimmed not yet)
        self._counts["trimmed"] += len(victims)
        self._counts["destroyed"] += len(victims)
        await asyncio.gather(*(sb.kill() for sb in victims), return_exceptions=True)
        return len(victims)

    def stats(self) -> PoolStats:
        times = list(self._restore_times)
        return PoolStats(ready=len(self._ready), in_flight=len(self._in_flight),
                         in_use=len(self._in_use), restore_ms_p50=_pct(times, 50),
                         restore_ms_p99=_pct(times, 99),
                         last_error=f"{self.last_error.code}: {self.last_error.message}"[:500]
                         if self.last_error else None, **self._counts)

    async def wait_ready(self, n: int | None = None, *, timeout: float = 120.0) -> None:
        """Wait until ``n`` (default ``min_size``) sandboxes are ready. Raises PoolExhausted."""
        n = self.min_size if n is None else n
        deadline = time.monotonic() + timeout
        while len(self._ready) < n:
            if time.monotonic() > deadline:
                raise PoolExhausted(f"only {len(self._ready)} of {n} sandboxes ready after"
                                    f" {timeout} s")
            await asyncio.sleep(0.01)

    @property
    def restore_times(self) -> list[float]:
        return list(self._restore_times)


class Pool:
    """Sync twin of AsyncPool: ``with pool.acquire(timeout=5) as sb: ...``.

    Construction starts filling at once (on the portal's event loop).
    """

    def __init__(self, *, snapshot: Snapshot | str | Path, min_size: int = 1,
                 max_size: int = 8, idle_timeout: float | None = 300.0,
                 store: SnapshotStore | None = None,
                 network: NetworkPolicy | None = None) -> None:
        async def make() -> AsyncPool:
            return await AsyncPool(snapshot=snapshot, min_size=min_size, max_size=max_size,
                                   idle_timeout=idle_timeout, store=store,
                                   network=network).start()

        self._a = _portal.call(make())

    @contextlib.contextmanager
    def acquire(self, *, timeout: float | None = 30.0) -> Iterator[Sandbox]:
        """A ready sandbox for the ``with`` block; destroyed afterwards. Raises PoolExhausted."""
        inner = _portal.call(self._a.acquire(timeout=timeout))
        try:
            yield Sandbox(inner)
        finally:
            _portal.call(self._a.release(inner))

    def stats(self) -> PoolStats:
        return self._a.stats()

    def trim(self) -> int:
        return _portal.call(self._a.trim())

    def wait_ready(self, n: int | None = None, *, timeout: float = 120.0) -> None:
        _portal.call(self._a.wait_ready(n, timeout=timeout))

    def close(self) -> None:
        _portal.call(self._a.close())

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
