"""The FastAPI application behind `chestxray serve`: a REST API and a one-page viewer.

Endpoints (all JSON errors are `{"detail": "..."}`):
  POST   /api/v1/predict                       multipart `file` -> findings (as `predict --format json`)
  POST   /api/v1/cam?finding=NAME              multipart `file` -> Grad-CAM overlay PNG
  POST   /api/v1/analyses                      multipart `file` -> findings + links, kept in memory
  GET    /api/v1/analyses/{id}/image.png       the decoded radiograph (DICOM too) as grayscale PNG
  GET    /api/v1/analyses/{id}/cam.png?finding Grad-CAM overlay of a stored analysis
  DELETE /api/v1/analyses/{id}                 forget it now
  GET    /api/v1/model, /healthz, /            model card facts, liveness, the viewer

Uploads are read into memory only (see `uploads.py`), never logged, and called "upload".
Inference holds one lock: the torch model and its Grad-CAM hooks are shared state, and
on a CPU one request at a time is also the fastest order. Decoding, resizing and PNG
encoding run outside the lock, in Starlette's thread pool, so the event loop stays free.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from importlib.resources import files
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from chestxray import NOT_FOR_CLINICAL_USE, __version__
from chestxray.data.images import read_image, sniff_image_format
from chestxray.errors import ChestXrayError, ImageReadError
from chestxray.inference.predict import Prediction
from chestxray.serve import render
from chestxray.serve.schemas import AnalysisOut, ErrorOut, HealthOut, ModelOut, PredictionOut
from chestxray.serve.store import Analysis, ResultStore
from chestxray.serve.uploads import FIELD, UploadError, read_file_field

T = TypeVar("T")

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
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
    413: {"model": ErrorOut, "description": "upload larger than the server's limit"},
    415: {"model": ErrorOut, "description": "not multipart, or not a PNG, JPEG or DICOM image"},
    422: {"model": ErrorOut, "description": "missing form field, unknown finding, or unreadable image data"},
}
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "PNG image"},
}
NOT_FOUND = {404: {"model": ErrorOut, "description": "unknown or expired analysis id"}}
NO_CAM = {501: {"model": ErrorOut, "description": "the backend has no Grad-CAM (ONNX)"}}


def decode_upload(data: bytes) -> np.ndarray:
    """Upload bytes -> HxW uint8, or an UploadError with a 4xx status that says why."""
    if not data:
        raise UploadError(400, "the file is empty")
    if sniff_image_format(data[:132]) is None:
        # Some systems write DICOM datasets without the 128-byte preamble and "DICM":
        # try reading it as DICOM before refusing (the CLI does so by the .dcm suffix).
        try:
            return read_image(data, name=UPLOAD_NAME + ".dcm")
        except ImageReadError:
            raise UploadError(415, "not a PNG, JPEG or DICOM image") from None
    try:
        return read_image(data, name=UPLOAD_NAME)
    except ImageReadError as exc:
        raise UploadError(422, f"cannot read the image: {exc.reason}") from None


def _static_files() -> dict[str, bytes]:
    root = files("chestxray.serve").joinpath("static")
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and not f.name.startswith(".")}


def create_app(
    analyzer: Any,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    result_ttl_s: float = 600.0,
    store_max_bytes: int = 256 * 2**20,
    display_max_side: int = render.DISPLAY_MAX_SIDE,
) -> FastAPI:
    """A FastAPI app serving `analyzer` (a `chestxray.inference.predict.Analyzer`)."""
    if max_upload_bytes < 1:
        raise ChestXrayError("max_upload_bytes must be positive")
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
        .replace("{{MAX_UPLOAD_MB}}", f"{max_upload_bytes / 2**20:.4g}")
    )

    app = FastAPI(
        title="chestxray",
        version=__version__,
        summary="Findings and Grad-CAM for chest radiographs (14 NIH ChestX-ray14 findings).",
        description=f"Model: **{analyzer.name}**. {NOT_FOR_CLINICAL_USE} Uploads are kept in memory only.",
        # Swagger UI and ReDoc load their scripts from a CDN; this server serves nothing from
        # the internet, so it offers the schema itself at /openapi.json instead.
        docs_url=None,
        redoc_url=None,
    )
    app.state.analyzer = analyzer
    app.state.store = store
    app.state.max_upload_bytes = max_upload_bytes

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"  # results are medical data
        return response

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable string, like every other error of this API (FastAPI's default is a list).
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this, so the server logs the traceback (no upload data in it).
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # -- helpers ---------------------------------------------------------------------

    async def read_upload(request: Request) -> np.ndarray:
        data = await read_file_field(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
            max_upload_bytes,
        )
        from chestxray.inference.input_check import dicom_warnings

        request.state.header_warnings = dicom_warnings(data, UPLOAD_NAME)  # lateral / not chest (DICOM only)
        return await run_in_threadpool(decode_upload, data)

    def locked(fn: Callable[..., T], *args: Any) -> T:
        with lock:
            return fn(*args)

    def predict(gray: np.ndarray) -> Prediction:
        result = analyzer.predict(gray, names=[UPLOAD_NAME])
        if result.error:  # not expected for a decoded array; never answer with a half result
            raise UploadError(422, f"cannot analyse the image: {result.error}")
        return result

    def check_finding(finding: str) -> str:
        if not has_cam:
            raise HTTPException(501, f"Grad-CAM needs the torch backend; this server runs {backend}")
        from chestxray.inference.explain import resolve_findings

        try:  # exact, case-insensitive or NIH spelling ("Infiltrate"); unknown -> ChestXrayError
            index = resolve_findings(labels, [finding])[0]  # type: ignore[index]
        except ChestXrayError as exc:
            raise HTTPException(422, str(exc)) from None
        return labels[index]

    def heatmap(gray: np.ndarray, finding: str) -> np.ndarray:
        from chestxray.inference.explain import explain

        try:
            _, cams = explain(analyzer, gray, [finding], name=UPLOAD_NAME)
        except ImageReadError as exc:
            raise UploadError(422, f"cannot read the image: {exc.reason}") from None
        except ChestXrayError as exc:
            raise HTTPException(422, str(exc)) from None
        return cams[0].heatmap

    async def cam_png(gray: np.ndarray, finding: str) -> bytes:
        heat = await run_in_threadpool(locked, heatmap, gray, finding)
        return await run_in_threadpool(render.cam_png, gray, heat, display_max_side)

    def get_analysis(analysis_id: str) -> Analysis:
        item = store.get(analysis_id)
        if item is None:
            raise HTTPException(404, "unknown or expired analysis; upload the image again")
        return item

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png")

    # -- API -------------------------------------------------------------------------

    @app.get("/healthz", response_model=HealthOut, tags=["service"])
    def healthz() -> HealthOut:
        return HealthOut(status="ok", model=analyzer.name)

    @app.get("/api/v1/model", response_model=ModelOut, tags=["model"])
    def model_info() -> ModelOut:
        meta = analyzer.meta
        return ModelOut(
            name=analyzer.name,
            backend=backend,
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
        gray = await read_upload(request)
        result = await run_in_threadpool(locked, predict, gray)
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
        gray = await read_upload(request)
        return png(await cam_png(gray, name))

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
        gray = await read_upload(request)
        result = await run_in_threadpool(locked, predict, gray)
        result.warnings += request.state.header_warnings
        display = await run_in_threadpool(render.fit, gray, display_max_side)
        key = store.add(Analysis(gray=gray, display=display, prediction=result))
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
        return png(await run_in_threadpool(render.png_bytes, item.display))

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
            cached = await cam_png(item.gray, name)
            store.add_cam(analysis_id, name, cached)
        return png(cached)

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
