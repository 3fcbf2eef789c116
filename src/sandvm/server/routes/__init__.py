"""The HTTP API's routes, one module per resource; ``create_app`` includes ROUTERS in
this order (the order routes are matched in)."""

from fastapi import APIRouter

from sandvm.server.routes import (
    commands,
    files,
    network,
    pools,
    sandboxes,
    server,
    snapshots,
)

ROUTERS: list[APIRouter] = [server.router, sandboxes.router, snapshots.router, pools.router,
                            commands.router, files.router, network.router]

__all__ = ["ROUTERS"]
