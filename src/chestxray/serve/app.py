"""The FastAPI application behind `chestxray serve`: a REST API (`api.py`), a one-page
viewer (`page.py`) and liveness, readiness and metrics (`health.py`), sharing one
`ServeRuntime` (`state.py`) on `app.state.runtime`.

Uploads are read into memory only (see `uploads.py`), never logged, and called "upload".
Receiving, admission, the decode pool and batching are in `runtime.py`: a body is read
before a compute slot is taken, a full server answers 503 with Retry-After at once;
decodes run in their own small pool, and inference (batches and Grad-CAM) in one thread,
as the torch model and its Grad-CAM hooks are shared state.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chestxray import NOT_FOR_CLINICAL_USE, __version__
from chestxray.errors import ChestXrayError
from chestxray.serve import api, health, page, render, viewer_routes
from chestxray.serve.api import UPLOAD_ROUTES
from chestxray.serve.metrics import ACCESS_LOG, access_line, quiet_third_party_loggers
from chestxray.serve.runtime import Busy, ServeSettings
from chestxray.serve.schemas import HealthOut
from chestxray.serve.state import CAM_NOTE_HEADER, UPLOAD_NAME, ServeRuntime, decode_upload, shorten
from chestxray.serve.studies import StudySource, studies_router
from chestxray.serve.uploads import UploadError, check_upload_headers

__all__ = ["CAM_NOTE_HEADER", "CONFIG_ENV", "UPLOAD_NAME", "app_from_env", "create_app", "decode_upload", "shorten"]

CONFIG_ENV = "CHESTXRAY_SERVE_CONFIG"  # how `--workers N` hands the model and settings to each worker
access_log = logging.getLogger(ACCESS_LOG)
#: The routers of the app, in order; a new front end adds its router here.
ROUTERS = (health.router, api.router, viewer_routes.router, page.router)
#: Methods that get their own metrics label; any other (a client may invent them) counts as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SECURITY_HEADERS = {
    # Everything the page needs comes from this server; nothing from the internet.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

FAST_ROUTES = {p: type("FastRoute", (), {"path": p})() for p in ("/healthz", *UPLOAD_ROUTES)}


async def _send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ObserveRequests:
    """Security headers, a request id, metrics and one access-log line per request.

    A plain ASGI middleware rather than `@app.middleware("http")`: it adds no task or
    stream per request, which keeps /healthz fast during a burst.
    """

    def __init__(self, app: ASGIApp, runtime: ServeRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.health = HealthOut(status="ok", model=runtime.analyzer.name).model_dump_json().encode()
        self.retry_after = str(runtime.settings.retry_after_s).encode()

    def refuse(self, scope: Scope) -> bytes | None:
        """The 503 body for an upload that would find no place, or None (header errors,
        413 and 415, are left to the route: they say more than "busy")."""
        rt = self.runtime
        head = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            check_upload_headers(head.get("content-type"), head.get("content-length"), rt.settings.max_upload_bytes)
        except UploadError:
            return None
        client = scope.get("client")
        busy = rt.receiving.refusal(str(client[0]) if client else "unknown")
        reason = "receiving_full"
        if busy is None and not rt.admission.has_room:
            busy, reason = (
                f"the server is busy ({rt.admission.limit} requests in progress); retry shortly",
                "queue_full",
            )
        if busy is None:
            return None
        self.metrics.rejections.labels(reason=reason).inc()
        return json.dumps({"detail": busy}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        timings: dict[str, float] = {}
        scope.setdefault("state", {})["timings"] = timings
        status = [500]
        api = str(scope.get("path", "")).startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
                if api:
                    headers["Cache-Control"] = "no-store"  # results are medical data
                headers["X-Request-ID"] = request_id
            await send(message)

        try:
            # Liveness and "full" answers skip routing and validation: during a burst they are
            # what the event loop must still do in a few milliseconds.
            path, method = scope.get("path"), scope.get("method")
            if path == "/healthz" and method == "GET":
                scope["route"] = FAST_ROUTES["/healthz"]
                await _send_json(send_with_headers, 200, self.health)
            elif method == "POST" and path in UPLOAD_ROUTES and (busy := self.refuse(scope)) is not None:
                scope["route"] = FAST_ROUTES[path]
                await _send_json(send_with_headers, 503, busy, [(b"retry-after", self.retry_after)])
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            self._record(scope, request_id, status[0], time.perf_counter() - start, timings)

    def _record(self, scope: Scope, request_id: str, status: int, elapsed: float, timings: dict[str, float]) -> None:
        # Route templates of this app only, and a fixed set of methods: a client cannot add series.
        route = str(getattr(scope.get("route"), "path", None) or "other")
        method = str(scope.get("method", ""))
        method = method if method in METHODS else "other"
        self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
        self.metrics.latency.labels(route=route).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            # The route template, never the path: analysis ids and query values stay out of logs.
            fields: dict[str, object] = {
                "request_id": request_id,
                "method": method,
                "route": route,
                "status": status,
                "ms": round(elapsed * 1000, 1),
            }
            fields.update({f"{k}_ms": round(v * 1000, 1) for k, v in timings.items()})
            access_log.info(access_line(fields))


def create_app(
    analyzer: Any,
    *,
    settings: ServeSettings | None = None,
    result_ttl_s: float = 600.0,
    store_max_bytes: int = 256 * 2**20,
    display_max_side: int = render.DISPLAY_MAX_SIDE,
    model_file: str | os.PathLike | None = None,
    studies: StudySource | None = None,
    show_patient_names: bool = False,
) -> FastAPI:
    """A FastAPI app serving `analyzer` (a `chestxray.inference.predict.Analyzer`) within
    the limits of `settings`. `model_file`, the analyzer's file, lets the viewer offer DICOM
    SRs (with the pacs extra); `studies` adds the Studies page over that PACS."""
    settings = settings or ServeSettings()
    quiet_third_party_loggers()
    runtime = ServeRuntime(
        analyzer,
        settings,
        result_ttl_s=result_ttl_s,
        store_max_bytes=store_max_bytes,
        display_max_side=display_max_side,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The model's many long-lived objects leave the cyclic GC's view: a full collection,
        # set off by a request that allocates much (a DICOM header), then no longer walks them
        # while holding the GIL (it paused the event loop for a third of a second).
        gc.freeze()
        yield
        await runtime.close()

    app = FastAPI(
        title="chestxray",
        version=__version__,
        summary="Findings and Grad-CAM for chest radiographs (14 NIH ChestX-ray14 findings).",
        description=f"Model: **{analyzer.name}**. {NOT_FOR_CLINICAL_USE} Uploads are kept in memory only.",
        # Swagger UI and ReDoc load their scripts from a CDN; this server serves nothing from
        # the internet, so it offers the schema itself at /openapi.json instead.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    # Shortcuts for tests and operators.
    app.state.analyzer, app.state.settings, app.state.store = analyzer, settings, runtime.store
    app.state.metrics, app.state.admission = runtime.metrics, runtime.admission
    app.add_middleware(ObserveRequests, runtime=runtime)
    for error, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.state.sr_reports = viewer_routes.SrReports(analyzer, model_file)
    for router in ROUTERS:
        if router is page.router and studies is not None:
            app.include_router(studies_router(studies, show_patient_names=show_patient_names))
        app.include_router(router)
    return app


async def _upload_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UploadError)
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    retry = str(request.app.state.settings.retry_after_s)
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": retry})


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # One readable string, like every other error of this API (FastAPI's default is a list).
    assert isinstance(exc, RequestValidationError)
    parts = [
        f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {shorten(str(e.get('msg', 'invalid')))}"
        for e in exc.errors()
    ]
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this, so the server logs the traceback (no upload data in it).
    return JSONResponse({"detail": "internal server error"}, status_code=500)


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Any]] = {
    UploadError: _upload_error,
    Busy: _busy,
    RequestValidationError: _invalid_request,
    Exception: _internal_error,
}


def app_from_env() -> FastAPI:
    """The app of one worker of `chestxray serve --workers N` (a uvicorn factory): each worker
    loads its own model, as the serve command described it in CHESTXRAY_SERVE_CONFIG."""
    from chestxray.inference.predict import Analyzer

    try:
        config = json.loads(os.environ[CONFIG_ENV])
    except (KeyError, ValueError):
        raise ChestXrayError(f"{CONFIG_ENV} is not set: start workers with `chestxray serve --workers N`") from None
    from chestxray.pacs.engine import model_file

    analyzer = Analyzer.load(config["model"], backend=config["backend"], device=config["device"])
    path = model_file(config["model"], config["backend"])
    return create_app(analyzer, settings=ServeSettings(**config["settings"]), model_file=path)
