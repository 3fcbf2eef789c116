"""Warm pools of sandboxes restored from a snapshot."""

from sandvm.pools.pool import AsyncPool, Pool, PoolStats

__all__ = ["AsyncPool", "Pool", "PoolStats"]
