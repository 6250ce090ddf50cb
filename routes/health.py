"""``/health`` (liveness), ``/ready`` (readiness) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from routes.deps import MetricsDep

router = APIRouter(tags=["health"])


@router.get("/health")
@router.head("/health", include_in_schema=False)  # some probes send HEAD
async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers, from the moment it listens (the models load behind it). Only a load
    that failed, which no waiting mends, makes it 503, so that an orchestrator restarts the process."""
    failed = _load_failure(request)
    if failed:
        return JSONResponse({"status": "failed", "reason": failed}, status_code=503)
    return JSONResponse({"status": "ok"})


def _load_failure(request: Request) -> str | None:
    """Why loading failed, as the probes tell it: the error's kind only, since the message can name local
    paths and the probes answer without the API key; the log has the whole of it."""
    error = getattr(request.app.state, "load_error", None)
    return None if error is None else f"loading failed ({type(error).__name__}); the server log says why"


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(request: Request) -> JSONResponse:
    """Readiness: models loaded and warmed up, and the engine has not failed."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is not None and engine.failure:
        return JSONResponse({"ready": False, "reason": "engine failed; restart the service"}, status_code=503)
    failed = _load_failure(request)
    if failed:
        return JSONResponse({"ready": False, "reason": failed}, status_code=503)
    if getattr(state, "shutting_down", False):
        return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
    if not state.ready:
        return JSONResponse({"ready": False, "reason": "loading"}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/metrics")
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics (behind the API key when one is set)."""
    return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)
