"""The REST API under /api/v1 (all JSON errors are `{"detail": "..."}`):

POST   /api/v1/predict                       multipart `file` -> findings (as `predict --format json`)
POST   /api/v1/cam?finding=NAME              multipart `file` -> Grad-CAM overlay PNG
POST   /api/v1/analyses                      multipart `file` -> findings + links, kept in memory
GET    /api/v1/analyses/{id}/image.png       the decoded radiograph (DICOM too) as grayscale PNG
GET    /api/v1/analyses/{id}/cam.png?finding Grad-CAM overlay of a stored analysis
DELETE /api/v1/analyses/{id}                 forget it now
GET    /api/v1/model                         model card facts
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.serve import render, viewer_routes
from chestxray.serve.schemas import AnalysisOut, ErrorOut, ModelOut, PredictionOut
from chestxray.serve.state import Runtime, png
from chestxray.serve.store import Analysis
from chestxray.serve.uploads import FIELD

UPLOAD_ROUTES = ("/api/v1/predict", "/api/v1/cam", "/api/v1/analyses")
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
    408: {"model": ErrorOut, "description": "the body did not arrive within the server's time limit or rate"},
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

router = APIRouter(prefix="/api/v1")


@router.get("/model", response_model=ModelOut, tags=["model"])
def model_info(rt: Runtime) -> ModelOut:
    analyzer, meta = rt.analyzer, rt.analyzer.meta
    return ModelOut(
        name=analyzer.name,
        backend=rt.backend,
        variant=analyzer.variant,
        labels=rt.labels,
        thresholds={lab: float(t) for lab, t in zip(rt.labels, analyzer.thresholds)},
        threshold_method=meta.threshold_method if meta else "",
        preprocessing=analyzer.preprocessing.to_dict(),
        metrics=dict(meta.metrics) if meta else {},
        training=dict(meta.training) if meta else {},
        grad_cam=rt.has_cam,
        calibration=meta.calibration if meta else None,
        operating_point=meta.operating_point if meta else None,
        input_check=meta.input_check if meta else None,
        max_upload_bytes=rt.settings.max_upload_bytes,
        note=NOT_FOR_CLINICAL_USE,
    )


@router.post("/predict", response_model=PredictionOut, responses=ERRORS, openapi_extra=UPLOAD_BODY, tags=["analysis"])
async def predict_upload(request: Request, rt: Runtime) -> dict[str, Any]:
    """Findings for one uploaded image, in the shape of `chestxray predict --format json`."""
    data, timings = await rt.receive(request), request.state.timings
    async with rt.admitted():
        gray, notes = await rt.decode(data, timings)
        del data
        result = await rt.predict(gray, timings)
    result.warnings += notes
    return result.to_dict()


@router.post(
    "/cam",
    response_class=Response,
    responses={**PNG_RESPONSE, **ERRORS, **NO_CAM},
    openapi_extra=UPLOAD_BODY,
    tags=["analysis"],
)
async def cam_upload(
    request: Request, rt: Runtime, finding: str = Query(description="one of the model's labels")
) -> Response:
    """The Grad-CAM of `finding` laid over the uploaded image (longest side at most 1024 px)."""
    name = rt.check_finding(finding)
    data, timings = await rt.receive(request), request.state.timings
    async with rt.admitted():
        gray, _ = await rt.decode(data, timings)
        del data
        return png(*await rt.overlay(gray, name, timings))


@router.post(
    "/analyses",
    response_model=AnalysisOut,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    tags=["analysis"],
    status_code=201,
)
async def create_analysis(request: Request, rt: Runtime) -> AnalysisOut:
    """Findings for one image, which the server keeps in memory for `expires_in_s` seconds
    so that the viewer can fetch the decoded image and Grad-CAM overlays."""
    data, timings = await rt.receive(request), request.state.timings
    async with rt.admitted():
        gray, notes = await rt.decode(data, timings)
        result = await rt.predict(gray, timings)
        result.warnings += notes
        display = await rt.decoder.run(render.fit, gray, rt.display_max_side)
        # The viewer's copy at the upload's own depth (a DICOM's modality values).
        full = await rt.within_deadline(rt.decoder.run(viewer_routes.full_depth, data, display, rt.limits))
        # A DICOM's patient and study modules and UIDs (not its pixels), for its SR download.
        sr_source = await rt.decoder.run(request.app.state.sr_reports.keep, data)
        del data
    viewer = {viewer_routes.FULL: full, viewer_routes.SR_SOURCE: sr_source}
    key = rt.store.add(Analysis(gray=gray, display=display, prediction=result, viewer=viewer))
    base = f"/api/v1/analyses/{key}"
    return AnalysisOut(
        id=key,
        expires_in_s=int(rt.store.ttl_s),
        width=int(display.shape[1]),
        height=int(display.shape[0]),
        image_url=f"{base}/image.png",
        cam_url=f"{base}/cam.png" if rt.has_cam else None,
        prediction=PredictionOut(**result.to_dict()),
    )


@router.get(
    "/analyses/{analysis_id}/image.png",
    response_class=Response,
    responses={**PNG_RESPONSE, **NOT_FOUND},
    tags=["analysis"],
)
async def analysis_image(analysis_id: str, rt: Runtime) -> Response:
    """The decoded radiograph as grayscale PNG (longest side at most 1024 px)."""
    item = rt.analysis(analysis_id)
    return png(await rt.decoder.run(render.png_bytes, item.display))


@router.get(
    "/analyses/{analysis_id}/cam.png",
    response_class=Response,
    responses={**PNG_RESPONSE, **NOT_FOUND, **NO_CAM, 422: ERRORS[422]},
    tags=["analysis"],
)
async def analysis_cam(
    analysis_id: str, rt: Runtime, finding: str = Query(description="one of the model's labels")
) -> Response:
    """The Grad-CAM overlay of `finding` for a stored analysis (computed once, then cached)."""
    item = rt.analysis(analysis_id)
    name = rt.check_finding(finding)
    cached = item.cams.get(name)
    if cached is None:
        async with rt.admitted():
            cached, note = await rt.overlay(item.gray, name, {})
        rt.store.add_cam(analysis_id, name, cached, note)
    return png(cached, item.notes.get(name))


@router.delete(
    "/analyses/{analysis_id}", status_code=204, response_class=Response, responses=NOT_FOUND, tags=["analysis"]
)
def delete_analysis(analysis_id: str, rt: Runtime) -> Response:
    """Forget a stored analysis now instead of at expiry."""
    if not rt.store.remove(analysis_id):
        raise HTTPException(404, "unknown or expired analysis")
    return Response(status_code=204)
