"""The FastAPI application behind `chestxray serve`: a REST API and a one-page viewer.

Endpoints (all JSON errors are `{"detail": "..."}`):
  POST   /api/v1/predict                       multipart `file` -> findings (as `predict --format json`)
  POST   /api/v1/cam?finding=NAME              multipart `file` -> Grad-CAM overlay PNG
  POST   /api/v1/analyses                      multipart `file` -> findings + links, kept in memory
  GET    /api/v1/analyses/{id}/image.png       the decoded radiograph (DICOM too) as grayscale PNG
  GET    /api/v1/analyses/{id}/cam.png?finding Grad-CAM overlay of a stored analysis
  DELETE /api/v1/analyses/{id}                 forget it now
  GET    /api/v1/model, /                      model card facts, the viewer
  GET    /healthz, /readyz, /metrics           liveness (event loop only), readiness, Prometheus

Uploads are read into memory only (see `uploads.py`), never logged, and called "upload".
Admission, the decode pool and batching are in `runtime.py`: a full server answers 503
with Retry-After at once; decodes run in their own small pool, and inference (batches and
Grad-CAM) in one thread, as the torch model and its Grad-CAM hooks are shared state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chestxray import NOT_FOR_CLINICAL_USE, __version__
from chestxray.data.images import DecodeLimitError, DecodeLimits, read_image, sniff_image_format
from chestxray.errors import ChestXrayError, ImageReadError
from chestxray.inference.predict import Prediction
from chestxray.serve import render, viewer_routes
from chestxray.serve.metrics import ACCESS_LOG, ServeMetrics, access_line, quiet_third_party_loggers
from chestxray.serve.runtime import Admission, Batcher, Busy, DecodePool, ServeSettings
from chestxray.serve.schemas import AnalysisOut, ErrorOut, HealthOut, ModelOut, PredictionOut, ReadyOut
from chestxray.serve.store import Analysis, ResultStore
from chestxray.serve.uploads import FIELD, UploadError, check_upload_headers, read_file_field

if TYPE_CHECKING:
    from chestxray.inference.explain import CamResult

T = TypeVar("T")

DEFAULT_MAX_UPLOAD_BYTES = ServeSettings.max_upload_bytes
ECHO_CHARS = 40  # longest client value quoted back in an error message
CONFIG_ENV = "CHESTXRAY_SERVE_CONFIG"  # how `--workers N` hands the model and settings to each worker
CAM_NOTE_HEADER = "X-Grad-CAM-Note"
access_log = logging.getLogger(ACCESS_LOG)
UPLOAD_NAME = "upload"  # what predictions call every upload; the client's file name is never used
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
SECURITY_HEADERS = {
    # Everything the page needs comes from this server; nothing from the internet.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "a chest radiograph: PNG, JPEG or DICOM",
                        }
                    },
                }
            }
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "empty file or malformed multipart body"},
    408: {"model": ErrorOut, "description": "the body did not arrive within the server's time limit"},
    413: {"model": ErrorOut, "description": "upload, or the image it decodes to, larger than the server's limit"},
    415: {"model": ErrorOut, "description": "not multipart, or not a PNG, JPEG or DICOM image"},
    422: {"model": ErrorOut, "description": "missing form field, unknown finding, or unreadable image data"},
    503: {"model": ErrorOut, "description": "server busy (queue full or deadline passed); see Retry-After"},
}
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "PNG image"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "unknown or expired analysis id"}}
NO_CAM: dict[int | str, dict[str, Any]] = {
    501: {"model": ErrorOut, "description": "the backend has no Grad-CAM (ONNX)"}
}


def decode_upload(data: bytes, limits: DecodeLimits | None = None) -> np.ndarray:
    """Upload bytes -> HxW uint8, or an UploadError with a 4xx status that says why
    (413 when the image would decode past `limits.max_bytes`)."""
    if not data:
        raise UploadError(400, "the file is empty")
    try:
        if sniff_image_format(data[:132]) is None:
            # Some systems write DICOM datasets without the 128-byte preamble and "DICM":
            # try reading it as DICOM before refusing (the CLI does so by the .dcm suffix).
            try:
                return read_image(data, name=UPLOAD_NAME + ".dcm", limits=limits)
            except DecodeLimitError:
                raise
            except ImageReadError:
                raise UploadError(415, "not a PNG, JPEG or DICOM image") from None
        return read_image(data, name=UPLOAD_NAME, limits=limits)
    except DecodeLimitError as exc:
        raise UploadError(413, f"image too large to decode: {exc.reason}") from None
    except ImageReadError as exc:
        raise UploadError(422, f"cannot read the image: {exc.reason}") from None


def shorten(value: str, limit: int = ECHO_CHARS) -> str:
    """A client value as error messages may quote it: at most `limit` characters."""
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


UPLOAD_ROUTES = ("/api/v1/predict", "/api/v1/cam", "/api/v1/analyses")
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

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServeMetrics,
        health: Callable[[], bytes],
        refuse: Callable[[Scope], bytes | None],
        retry_after_s: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.health = health
        self.refuse = refuse
        self.retry_after = str(retry_after_s).encode()

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
                await _send_json(send_with_headers, 200, self.health())
            elif method == "POST" and path in UPLOAD_ROUTES and (busy := self.refuse(scope)) is not None:
                scope["route"] = FAST_ROUTES[path]
                await _send_json(send_with_headers, 503, busy, [(b"retry-after", self.retry_after)])
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            self._record(scope, request_id, status[0], time.perf_counter() - start, timings)

    def _record(self, scope: Scope, request_id: str, status: int, elapsed: float, timings: dict[str, float]) -> None:
        route = str(getattr(scope.get("route"), "path", None) or "unmatched")
        method = str(scope.get("method", ""))
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


def _static_files() -> dict[str, bytes]:
    root = files("chestxray.serve").joinpath("static")
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and not f.name.startswith(".")}


def create_app(
    analyzer: Any,
    *,
    settings: ServeSettings | None = None,
    max_upload_bytes: int | None = None,
    result_ttl_s: float = 600.0,
    store_max_bytes: int = 256 * 2**20,
    display_max_side: int = render.DISPLAY_MAX_SIDE,
) -> FastAPI:
    """A FastAPI app serving `analyzer` (a `chestxray.inference.predict.Analyzer`) within
    the limits of `settings` (`max_upload_bytes`, when given, overrides its upload limit)."""
    if max_upload_bytes is not None and max_upload_bytes < 1:
        raise ChestXrayError("max_upload_bytes must be positive")
    settings = settings or ServeSettings()
    if max_upload_bytes is not None:
        settings = dataclasses.replace(settings, max_upload_bytes=int(max_upload_bytes))
    max_upload_bytes = settings.max_upload_bytes
    quiet_third_party_loggers()
    lock = threading.Lock()
    store = ResultStore(ttl_s=result_ttl_s, max_bytes=store_max_bytes)
    labels = list(analyzer.labels)
    backend = getattr(analyzer.backend, "name", "unknown")
    try:
        analyzer.model  # noqa: B018 - raises for backends without a torch model
        has_cam = True
    except ChestXrayError:
        has_cam = False
    static = _static_files()
    index_html = (
        static.pop("index.html")
        .decode("utf-8")
        .replace("{{MODEL}}", html.escape(analyzer.name))
        .replace("{{NOTE}}", html.escape(NOT_FOR_CLINICAL_USE))
        .replace("{{MAX_UPLOAD_MIB}}", f"{max_upload_bytes / 2**20:.4g}")
    )
    metrics = ServeMetrics(analyzer.name, backend)
    admission = Admission(settings.queue_length, on_change=metrics.queue_depth.set)
    decoder = DecodePool(settings.decode_threads)
    inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chestxray-infer")
    # Big images are decoded at a fraction of their size that still covers the display
    # and the model input; the budget is judged from the header before decoding.
    limits = DecodeLimits(
        max_bytes=settings.max_decode_bytes, reduce_to=max(display_max_side, int(analyzer.preprocessing.size))
    )

    def predict_many(grays: list[np.ndarray]) -> list[Prediction]:
        # Through Analyzer.predict, so a batch gets exactly what the CLI and the API give.
        with lock:
            return analyzer.predict(grays, names=[UPLOAD_NAME] * len(grays))

    batcher: Batcher[np.ndarray, Prediction] = Batcher(
        predict_many, inference, settings.max_batch, settings.max_wait_ms / 1000.0, on_batch=metrics.batch_size.observe
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.close()

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
    app.state.analyzer = analyzer
    app.state.store = store
    app.state.max_upload_bytes = max_upload_bytes
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.admission = admission

    health_body = HealthOut(status="ok", model=analyzer.name).model_dump_json().encode()

    def refuse_when_full(scope: Scope) -> bytes | None:
        """503 body when the queue is full and the headers pass the 413/415 checks (else None:
        the route answers, with its 413/415 first)."""
        if admission.has_room:
            return None
        head = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            check_upload_headers(head.get("content-type"), head.get("content-length"), max_upload_bytes)
        except UploadError:
            return None
        metrics.rejections.labels(reason="queue_full").inc()
        return json.dumps(
            {"detail": f"the server is busy ({admission.limit} requests in progress); retry shortly"}
        ).encode()

    app.add_middleware(
        ObserveRequests,
        metrics=metrics,
        health=lambda: health_body,
        refuse=refuse_when_full,
        retry_after_s=settings.retry_after_s,
    )

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.message}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)}
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable string, like every other error of this API (FastAPI's default is a list).
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {shorten(str(e.get('msg', 'invalid')))}"
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this, so the server logs the traceback (no upload data in it).
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # -- helpers ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(request: Request) -> AsyncIterator[dict[str, float]]:
        """Header checks (413, 415) first, then a place inside or 503 at once."""
        check_upload_headers(
            request.headers.get("content-type"), request.headers.get("content-length"), max_upload_bytes
        )
        try:
            admission.enter()
        except Busy:
            metrics.rejections.labels(reason="queue_full").inc()
            raise
        try:
            yield request.state.timings
        finally:
            admission.leave()

    async def timed(timings: dict[str, float], stage: str, work: Awaitable[T]) -> T:
        t = time.perf_counter()
        try:
            return await work
        finally:
            timings[stage] = time.perf_counter() - t
            metrics.stage.labels(stage=stage).observe(timings[stage])

    async def within_deadline(work: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(work, settings.request_deadline_s)
        except asyncio.TimeoutError:
            metrics.rejections.labels(reason="deadline").inc()
            raise Busy(f"the server could not answer within {settings.request_deadline_s:g} s; retry shortly") from None

    def decode(data: bytes) -> np.ndarray:
        try:
            return decode_upload(data, limits)
        except UploadError as exc:
            reason = {413: "decode_limit", 415: "not_an_image"}.get(exc.status, "unreadable")
            metrics.decode_refusals.labels(reason=reason).inc()
            raise

    async def read_upload(request: Request, timings: dict[str, float]) -> np.ndarray:
        data = await timed(
            timings,
            "read",
            read_file_field(
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                request.stream(),
                max_upload_bytes,
                timeout_s=settings.body_timeout_s,
            ),
        )
        from chestxray.inference.input_check import dicom_warnings

        request.state.header_warnings = dicom_warnings(data, UPLOAD_NAME)  # lateral / not chest (DICOM only)
        request.state.upload = data  # for the viewer's full-depth copy; gone with the request
        return await within_deadline(timed(timings, "decode", decoder.run(decode, data)))

    async def predict(gray: np.ndarray, timings: dict[str, float]) -> Prediction:
        result = await within_deadline(timed(timings, "inference", batcher.submit(gray)))
        if result.error:  # not expected for a decoded array; never answer with a half result
            raise UploadError(422, f"cannot analyse the image: {result.error}")
        return result

    def check_finding(finding: str) -> str:
        if not has_cam:
            raise HTTPException(501, f"Grad-CAM needs the torch backend; this server runs {backend}")
        from chestxray.inference.explain import resolve_findings

        try:  # exact, case-insensitive or NIH spelling ("Infiltrate"); unknown -> ChestXrayError
            index = resolve_findings(labels, [finding])[0]  # type: ignore[index]
        except ChestXrayError as exc:  # the message quotes the value: at most ECHO_CHARS of it
            raise HTTPException(422, str(exc).replace(finding, shorten(finding))) from None
        return labels[index]

    def heatmap(gray: np.ndarray, finding: str) -> "CamResult":
        from chestxray.inference.explain import explain

        try:
            _, cams = explain(analyzer, gray, [finding], name=UPLOAD_NAME)
        except ImageReadError as exc:
            raise UploadError(422, f"cannot read the image: {exc.reason}") from None
        except ChestXrayError as exc:
            raise HTTPException(422, str(exc)) from None
        return cams[0]

    def locked_heatmap(gray: np.ndarray, finding: str) -> "CamResult":
        with lock:
            return heatmap(gray, finding)

    app.state.heatmap_job = lambda gray, finding: within_deadline(  # the viewer's Grad-CAM, as cam_png runs it
        asyncio.get_running_loop().run_in_executor(inference, locked_heatmap, gray, finding)
    )

    async def cam_png(gray: np.ndarray, finding: str, timings: dict[str, float]) -> tuple[bytes, str | None]:
        """The overlay PNG and, for a map with no positive value, the note to show instead."""
        loop = asyncio.get_running_loop()
        # Grad-CAM is not batched: one image through the model's hooks on the inference thread.
        cam = await within_deadline(
            timed(timings, "inference", loop.run_in_executor(inference, locked_heatmap, gray, finding))
        )
        return await decoder.run(render.cam_png, gray, cam.heatmap, display_max_side), cam.note

    def get_analysis(analysis_id: str) -> Analysis:
        item = store.get(analysis_id)
        if item is None:
            raise HTTPException(404, "unknown or expired analysis; upload the image again")
        return item

    def png(data: bytes, note: str | None = None) -> Response:
        # The note ("no positive evidence for X") travels in a header; the viewer shows it.
        return Response(data, media_type="image/png", headers={CAM_NOTE_HEADER: note} if note else None)

    # -- API -------------------------------------------------------------------------

    @app.get("/healthz", response_model=HealthOut, tags=["service"])
    async def healthz() -> HealthOut:
        """Liveness: answered on the event loop, never behind decoding or inference."""
        return HealthOut(status="ok", model=analyzer.name)

    @app.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}}, tags=["service"])
    async def readyz() -> JSONResponse:
        """Readiness: the model is loaded and the queue has room (503 otherwise)."""
        loaded = analyzer is not None and getattr(analyzer, "backend", None) is not None
        out = ReadyOut(
            ready=loaded and admission.has_room,
            model_loaded=loaded,
            queue=admission.inside,
            queue_length=admission.limit,
        )
        return JSONResponse(out.model_dump(), status_code=200 if out.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/v1/model", response_model=ModelOut, tags=["model"])
    def model_info() -> ModelOut:
        meta = analyzer.meta
        return ModelOut(
            name=analyzer.name,
            backend=backend,
            variant=str(getattr(analyzer, "variant", backend)),
            labels=labels,
            thresholds={lab: float(t) for lab, t in zip(labels, analyzer.thresholds)},
            threshold_method=str(getattr(meta, "threshold_method", "") or ""),
            preprocessing=analyzer.preprocessing.to_dict(),
            metrics=dict(getattr(meta, "metrics", {}) or {}),
            training=dict(getattr(meta, "training", {}) or {}),
            grad_cam=has_cam,
            calibration=getattr(meta, "calibration", None),
            operating_point=getattr(meta, "operating_point", None),
            input_check=getattr(meta, "input_check", None),
            max_upload_bytes=max_upload_bytes,
            note=NOT_FOR_CLINICAL_USE,
        )

    @app.post(
        "/api/v1/predict", response_model=PredictionOut, responses=ERRORS, openapi_extra=UPLOAD_BODY, tags=["analysis"]
    )
    async def predict_upload(request: Request) -> dict[str, Any]:
        """Findings for one uploaded image, in the shape of `chestxray predict --format json`."""
        async with admitted(request) as timings:
            gray = await read_upload(request, timings)
            result = await predict(gray, timings)
        result.warnings += request.state.header_warnings
        return result.to_dict()

    @app.post(
        "/api/v1/cam",
        response_class=Response,
        responses={**PNG_RESPONSE, **ERRORS, **NO_CAM},
        openapi_extra=UPLOAD_BODY,
        tags=["analysis"],
    )
    async def cam_upload(request: Request, finding: str = Query(description="one of the model's labels")) -> Response:
        """The Grad-CAM of `finding` laid over the uploaded image (longest side at most 1024 px)."""
        name = check_finding(finding)
        async with admitted(request) as timings:
            gray = await read_upload(request, timings)
            return png(*await cam_png(gray, name, timings))

    @app.post(
        "/api/v1/analyses",
        response_model=AnalysisOut,
        responses=ERRORS,
        openapi_extra=UPLOAD_BODY,
        tags=["analysis"],
        status_code=201,
    )
    async def create_analysis(request: Request) -> AnalysisOut:
        """Findings for one image, which the server keeps in memory for `expires_in_s` seconds
        so that the viewer can fetch the decoded image and Grad-CAM overlays."""
        async with admitted(request) as timings:
            gray = await read_upload(request, timings)
            result = await predict(gray, timings)
            result.warnings += request.state.header_warnings
            display = await decoder.run(render.fit, gray, display_max_side)
            full = await within_deadline(decoder.run(viewer_routes.full_depth, request.state.upload, display, limits))
        key = store.add(Analysis(gray=gray, display=display, prediction=result, viewer={viewer_routes.FULL: full}))
        base = f"/api/v1/analyses/{key}"
        return AnalysisOut(
            id=key,
            expires_in_s=int(store.ttl_s),
            width=int(display.shape[1]),
            height=int(display.shape[0]),
            image_url=f"{base}/image.png",
            cam_url=f"{base}/cam.png" if has_cam else None,
            prediction=PredictionOut(**result.to_dict()),
        )

    @app.get(
        "/api/v1/analyses/{analysis_id}/image.png",
        response_class=Response,
        responses={**PNG_RESPONSE, **NOT_FOUND},
        tags=["analysis"],
    )
    async def analysis_image(analysis_id: str) -> Response:
        """The decoded radiograph as grayscale PNG (longest side at most 1024 px)."""
        item = get_analysis(analysis_id)
        return png(await decoder.run(render.png_bytes, item.display))

    @app.get(
        "/api/v1/analyses/{analysis_id}/cam.png",
        response_class=Response,
        responses={**PNG_RESPONSE, **NOT_FOUND, **NO_CAM, 422: ERRORS[422]},
        tags=["analysis"],
    )
    async def analysis_cam(analysis_id: str, finding: str = Query(description="one of the model's labels")) -> Response:
        """The Grad-CAM overlay of `finding` for a stored analysis (computed once, then cached)."""
        item = get_analysis(analysis_id)
        name = check_finding(finding)
        cached = item.cams.get(name)
        if cached is None:
            try:
                admission.enter()
            except Busy:
                metrics.rejections.labels(reason="queue_full").inc()
                raise
            try:
                cached, note = await cam_png(item.gray, name, {})
            finally:
                admission.leave()
            store.add_cam(analysis_id, name, cached, note)
        return png(cached, item.notes.get(name))

    @app.delete(
        "/api/v1/analyses/{analysis_id}",
        status_code=204,
        response_class=Response,
        responses=NOT_FOUND,
        tags=["analysis"],
    )
    def delete_analysis(analysis_id: str) -> Response:
        """Forget a stored analysis now instead of at expiry."""
        if not store.remove(analysis_id):
            raise HTTPException(404, "unknown or expired analysis")
        return Response(status_code=204)

    # -- the viewer ------------------------------------------------------------------

    app.include_router(viewer_routes.router)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    legend: list[bytes] = []

    @app.get("/static/cam-legend.png", include_in_schema=False)
    def cam_legend() -> Response:
        """The overlay's colour scale, drawn by the same `overlay` function as the CAMs."""
        if not has_cam:
            raise HTTPException(404, "not found")
        if not legend:
            legend.append(render.legend_png())
        return Response(legend[0], media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        data = static.get(name)
        suffix = name[name.rfind(".") :] if "." in name else ""
        if data is None or suffix not in STATIC_TYPES:
            raise HTTPException(404, "not found")
        return Response(data, media_type=STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"})

    return app


def app_from_env() -> FastAPI:
    """The app of one worker of `chestxray serve --workers N` (a uvicorn factory): each worker
    loads its own model, as the serve command described it in CHESTXRAY_SERVE_CONFIG."""
    from chestxray.inference.predict import Analyzer

    try:
        config = json.loads(os.environ[CONFIG_ENV])
    except (KeyError, ValueError):
        raise ChestXrayError(f"{CONFIG_ENV} is not set: start workers with `chestxray serve --workers N`") from None
    analyzer = Analyzer.load(config["model"], backend=config["backend"], device=config["device"])
    return create_app(analyzer, settings=ServeSettings(**config["settings"]))
