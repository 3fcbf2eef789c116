"""sandvm as a service: the HTTP API (`sandvm serve`), its keys, tenants and quotas.

    from sandvm.server import ServerConfig, create_app
    app = create_app(ServerConfig(max_sandboxes=5))   # an ASGI app (FastAPI)

The remote SDK that talks to it is ``sandvm.client``.
"""

from sandvm.server.app import create_app, openapi_document
from sandvm.server.config import DEFAULT_PORT, ServerConfig, server_dir
from sandvm.server.service import SandboxService
from sandvm.server.store import KeyInfo, ServerStore

__all__ = [
    "DEFAULT_PORT",
    "KeyInfo",
    "SandboxService",
    "ServerConfig",
    "ServerStore",
    "create_app",
    "openapi_document",
    "server_dir",
]
