"""Routes of the server itself: liveness (no key) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from sandvm.server.metrics import CONTENT_TYPE as METRICS_TYPE
from sandvm.server.models import Health
from sandvm.server.routes.common import (
    ERRORS,
    Tenant,
    service,
)
from sandvm.version import __version__

router = APIRouter()


@router.get("/health", response_model=Health, tags=["server"])
async def health() -> Health:
    """Liveness: no key needed."""
    return Health(status="ok", version=__version__)


@router.get("/metrics", response_class=PlainTextResponse, tags=["server"],
            responses={200: {"description": "Prometheus text format (0.0.4)."},
                       401: ERRORS[401]})
async def metrics(request: Request, tenant: Tenant) -> PlainTextResponse:
    """Prometheus metrics (any valid key; aggregate figures, no tenant labels)."""
    return PlainTextResponse(service(request).metrics.render(), media_type=METRICS_TYPE)
