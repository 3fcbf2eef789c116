"""Per-tenant rate limits: one token bucket per tenant, checked by the server's guard.

A request takes one token; a tenant's bucket holds at most ``burst`` tokens and gets
``rate`` new ones per second. A request finding the bucket empty is answered 429
(code ``rate_limited``) with ``Retry-After``: the whole seconds until a token is there.
Requests are counted, not bytes: a streamed response (command output, a download)
took its token when it started and is never cut. ``/health`` and ``/openapi.json`` are
not limited (nor authenticated).

Memory stays bounded whatever the clients do: buckets are per tenant (tenants come from
the key store, not from requests), and full buckets are forgotten (a full bucket is the
same as no bucket).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from sandvm.errors import ConfigError, RateLimited

PRUNE_EVERY = 1024  # requests between sweeps of full buckets


class RateLimiter:
    """Token buckets by tenant. ``take(tenant)`` returns 0.0 when the request may go on,
    else the seconds until it would be allowed. Single-threaded (the server's event
    loop); ``clock`` is injectable for tests."""

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not \
                0 < rate <= 1e6:
            raise ConfigError(f"rate limit must be requests per second in (0, 1e6], got"
                              f" {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 10**6:
            raise ConfigError(f"rate burst must be an int in 1..1000000, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant: (tokens, at)
        self._since_prune = 0

    def take(self, tenant: str) -> float:
        """Take a token of ``tenant``'s bucket: 0.0 if there was one, else the seconds
        until there will be (nothing is taken then)."""
        now = self._clock()
        tokens, at = self._buckets.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self._prune(now)
        if tokens >= 1.0:
            self._buckets[tenant] = (tokens - 1.0, now)
            return 0.0
        self._buckets[tenant] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        self._since_prune = 0
        for tenant, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[tenant]

    def error(self, wait: float) -> RateLimited:
        """The 429 answer for a request that must wait ``wait`` seconds."""
        secs = retry_after_seconds(wait)
        return RateLimited(f"too many requests: this server allows {self.rate:g} per second"
                           f" per tenant (bursts of {self.burst}); retry in {secs} s",
                           retry_after=float(secs))


def retry_after_seconds(wait: float) -> int:
    """``Retry-After`` is whole seconds (RFC 9110): rounded up, at least 1."""
    return max(1, math.ceil(wait))


def limiter_for(rate: float | None, burst: int | None) -> RateLimiter | None:
    """The limiter of the server's settings (None: no limit). The burst defaults to one
    second's worth of requests (at least 1)."""
    if rate is None:
        return None
    return RateLimiter(rate, burst if burst is not None else max(1, math.ceil(rate)))
