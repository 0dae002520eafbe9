"""Liveness, readiness and Prometheus metrics: /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from chestxray.serve.schemas import HealthOut, ReadyOut
from chestxray.serve.state import Runtime

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=HealthOut)
async def healthz(rt: Runtime) -> HealthOut:
    """Liveness: answered on the event loop, never behind decoding or inference
    (the middleware answers it before routing; this route documents it)."""
    return HealthOut(status="ok", model=rt.analyzer.name)


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(rt: Runtime) -> JSONResponse:
    """Readiness: the model is loaded and the queue has room (503 otherwise)."""
    loaded = rt.analyzer.backend is not None
    out = ReadyOut(
        ready=loaded and rt.admission.has_room,
        model_loaded=loaded,
        queue=rt.admission.inside,
        queue_length=rt.admission.limit,
    )
    return JSONResponse(out.model_dump(), status_code=200 if out.ready else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus(rt: Runtime) -> Response:
    return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
