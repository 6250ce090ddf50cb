"""``/health`` (liveness), ``/ready`` (readiness) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from routes.deps import MetricsDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: models loaded and warmed up, and the engine has not failed."""
    engine = getattr(request.app.state, "engine", None)
    if engine is not None and engine.failure:
        return JSONResponse({"ready": False, "reason": "engine failed; restart the service"}, status_code=503)
    is_ready = bool(request.app.state.ready)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/metrics")
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics (behind the API key when one is set)."""
    return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)
