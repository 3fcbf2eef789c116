"""The server's settings: where its state lives, tenants' quotas, request caps."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sandvm.errors import ConfigError

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
    holds. Raises ConfigError for
    values out of range.
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
        object.__setattr__(self, "state_dir", Path(self.state_dir))
