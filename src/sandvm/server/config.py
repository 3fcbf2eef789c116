"""The server's settings: where its state lives, tenants' quotas, request caps."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sandvm.errors import ConfigError, SandvmError

DEFAULT_PORT = 7070


def server_dir() -> Path:
    """``$SANDVM_SERVER_DIR`` or ``$SANDVM_HOME/server``: API keys and sandbox owners."""
    env = os.environ.get("SANDVM_SERVER_DIR")
    if env:
        return Path(env)
    from sandvm.assets import sandvm_home

    return sandvm_home() / "server"


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """What `sandvm serve` enforces. Every cap is per request or per tenant.

    ``state_dir``: keys and ownership (``server.db``, mode 0600). ``max_sandboxes``:
    live sandboxes per tenant. ``default_ttl``/``max_ttl``: a sandbox's lifetime in
    seconds. ``max_memory_mib``/``max_vcpus``: per sandbox. ``max_json_bytes``: a JSON
    request body. ``max_upload_bytes``/``max_download_bytes``: one file.
    ``max_header_bytes``: all request headers together. ``max_commands``: background
    commands a sandbox keeps (running and ended; the oldest ended ones go first).
    ``command_buffer_bytes``: output kept per background command (the oldest goes).
    ``attach_wait``: seconds to wait for a sandbox another process (e.g. `sandvm exec`)
    holds. ``max_tenant_memory_mib``: memory of a tenant's sandboxes and pools together.
    ``max_tenant_ports``, ``port_host``: exposed ports per tenant, where they listen.
    ``rate_limit``/``rate_burst``: requests per second per tenant. ``max_snapshots``,
    ``max_pools``: per tenant; ``max_snapshot_bytes``: the disk a tenant's snapshots
    take together; ``max_pool_size``: the ``max_size`` of a tenant's pools
    summed; ``max_fork``: copies per fork; ``pool_acquire_timeout``: the longest a
    create-from-pool waits. Raises ConfigError for values out of range.
    """

    state_dir: Path = field(default_factory=server_dir)
    max_sandboxes: int = 10
    default_ttl: float = 300.0
    max_ttl: float = 24 * 3600.0
    max_memory_mib: int = 4096
    max_vcpus: int = 4
    max_json_bytes: int = 1 << 20
    max_upload_bytes: int = 1 << 30
    max_download_bytes: int = 1 << 30
    max_header_bytes: int = 16 << 10
    attach_wait: float = 10.0
    max_commands: int = 32
    command_buffer_bytes: int = 1 << 20
    # -- snapshots, fork, pools (per tenant; checked in _check_library)
    max_snapshots: int = 20
    # bytes a tenant's snapshots take on disk together (RAM, state, disk layers; None:
    # only max_snapshots caps them)
    max_snapshot_bytes: int | None = 16 << 30
    max_pools: int = 4
    max_pool_size: int = 32  # sandboxes a tenant's pools keep waiting (max_size summed)
    max_fork: int = 16  # copies one fork makes
    pool_acquire_timeout: float = 60.0  # seconds a create-from-pool waits for a sandbox
    # -- tenants' memory, exposed ports, request rates (checked in _check_limits)
    # memory_mib of a tenant's live sandboxes together (None: only max_sandboxes caps it)
    max_tenant_memory_mib: int | None = None
    # guest ports a tenant keeps exposed at once (over all its sandboxes)
    max_tenant_ports: int = 16
    # the address exposed ports listen on (an IP literal; 0.0.0.0 opens them to the network)
    port_host: str = "127.0.0.1"
    # requests per second per tenant (a token bucket; None: no limit) and the bucket's
    # size (None: one second's worth)
    rate_limit: float | None = None
    rate_burst: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_sandboxes", "max_memory_mib", "max_vcpus", "max_json_bytes",
                     "max_upload_bytes", "max_download_bytes", "max_header_bytes",
                     "max_commands", "command_buffer_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"server setting {name} must be a positive int, got {v!r}")
        for name in ("default_ttl", "max_ttl"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"server setting {name} must be positive seconds, got {v!r}")
        if self.default_ttl > self.max_ttl:
            raise ConfigError("default_ttl must not be larger than max_ttl")
        if self.attach_wait < 0:
            raise ConfigError("attach_wait must be >= 0")
        self._check_library()
        self._check_limits()
        object.__setattr__(self, "state_dir", Path(self.state_dir))

    def _check_limits(self) -> None:
        """Memory, port and rate settings. Raises ConfigError."""
        from sandvm.ports import check_bind_host
        from sandvm.server.ratelimit import limiter_for

        mem = self.max_tenant_memory_mib
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int) or mem < 1):
            raise ConfigError(f"server setting max_tenant_memory_mib must be a positive int"
                              f" or None, got {mem!r}")
        n = self.max_tenant_ports
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 4096:
            raise ConfigError(f"server setting max_tenant_ports must be an int in 0..4096,"
                              f" got {n!r}")
        try:
            object.__setattr__(self, "port_host", check_bind_host(self.port_host))
        except SandvmError as exc:
            raise ConfigError(f"server setting port_host: {exc.message}") from None
        if self.rate_burst is not None and self.rate_limit is None:
            raise ConfigError("rate_burst needs rate_limit")
        limiter_for(self.rate_limit, self.rate_burst)  # raises ConfigError

    def _check_library(self) -> None:
        """Snapshot, fork and pool settings. Raises ConfigError."""
        from sandvm.runtime.manager import MAX_TTL

        if self.max_ttl > MAX_TTL:
            raise ConfigError(f"server setting max_ttl must be at most {MAX_TTL:.0f} s (7"
                              f" days, the runtime's cap), got {self.max_ttl!r}")
        for name, lo in (("max_snapshots", 0), ("max_pools", 0), ("max_pool_size", 1),
                         ("max_fork", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 4096:
                raise ConfigError(f"server setting {name} must be an int in {lo}..4096,"
                                  f" got {v!r}")
        v = self.max_snapshot_bytes
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"server setting max_snapshot_bytes must be a positive int or"
                              f" None, got {v!r}")
        v = self.pool_acquire_timeout
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
            raise ConfigError("server setting pool_acquire_timeout must be seconds in"
                              f" (0, 3600], got {v!r}")
