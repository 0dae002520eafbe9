"""What the reading viewer asks of a stored analysis, beyond the core API.

  GET /api/v1/analyses/{id}/display       pixel metadata: value range, the DICOM's window, links
  GET /api/v1/analyses/{id}/pixels.png    the analysed image at full depth: 16-bit grayscale PNG
  GET /api/v1/analyses/{id}/heat.png      a finding's Grad-CAM in colour (no image under it)
  GET /api/v1/analyses/{id}/result.json   the findings as a download
  GET /api/v1/analyses/{id}/report.png    a one-page PNG report
  GET /api/v1/analyses/{id}/sr.dcm        the findings as this model's DICOM SR (DICOM inputs)

The page windows the 16-bit values itself (through a lookup table), so window/level needs no
request; the heat map comes without the image so that the page can fade it.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.data.images import DecodeLimits, read_dicom_values, sniff_image_format
from chestxray.errors import ChestXrayError, ImageReadError
from chestxray.serve import render
from chestxray.serve.state import Runtime, ServeRuntime
from chestxray.serve.store import Analysis

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from chestxray.inference.predict import Prediction
    from chestxray.pacs.studies import SrMaker

router = APIRouter(tags=["viewer"])
PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "PNG image"}}
MISSING: dict[int | str, dict[str, Any]] = {404: {"description": "unknown or expired analysis id"}}
FULL = "full"
STUDIES_ROUTE = "chestxray_studies"  # the name of the study list route, when a PACS is configured
SR_SOURCE = "sr_source"  # a DICOM input's patient and study modules and UIDs (no pixels), for its SR


@dataclass(frozen=True)
class FullDepth:
    """The displayed image's values as uint16: value = offset + slope * stored."""

    stored: np.ndarray  # HxW uint16, the size of the analysis' display image
    offset: float
    slope: float
    window: tuple[float, float] | None  # the DICOM's own (centre, width), in stored units
    source: str  # "DICOM" or "8-bit image"

    @property
    def nbytes(self) -> int:
        return int(self.stored.nbytes)


@dataclass(frozen=True)
class HeatLayer:
    rgb: np.ndarray  # HxWx3 uint8: the overlay's colour map of the heat map, display size
    alpha: float  # how much of it the server's overlay blends in (0: the map has no evidence)
    caption: str
    png: bytes

    @property
    def nbytes(self) -> int:
        return int(self.rgb.nbytes + len(self.png))


class SrReports:
    """This model's DICOM SR of stored analyses, built by the pacs package (its extra) for the
    model file `model_file`, whose SHA-256 names the model in the SR and derives its UIDs."""

    def __init__(self, analyzer: Any, model_file: str | os.PathLike | None) -> None:
        self.analyzer, self.model_file = analyzer, model_file
        self.available = model_file is not None and importlib.util.find_spec("highdicom") is not None
        self._maker: SrMaker | None = None
        self._lock = threading.Lock()

    def keep(self, data: bytes) -> Dataset | None:
        """What an SR needs of an input, when it is DICOM and an SR can be built here; else None."""
        if not self.available or sniff_image_format(data[:132]) not in (None, "dicom"):
            return None
        from chestxray.pacs.studies import sr_source_of_bytes

        return sr_source_of_bytes(data)

    def encode(self, source: Dataset, prediction: Prediction) -> bytes:
        from chestxray.pacs.studies import SrMaker

        with self._lock:
            if self._maker is None:
                from chestxray.pacs.engine import model_info

                self._maker = SrMaker(model_info(self.analyzer, self.model_file, str(self.analyzer.backend.name)))
        return self._maker.encode(source, prediction)


def full_depth(data: bytes, display: np.ndarray, limits: DecodeLimits | None = None) -> FullDepth:
    """The upload at its own depth, at the display image's size: a grayscale DICOM's modality
    values (larger = brighter), else the 8-bit display image itself."""
    # Like the upload path: data that is no known raster format may be DICOM without its preamble.
    name = "upload.dcm" if sniff_image_format(data[:132]) is None else "upload"
    try:
        dicom = read_dicom_values(data, name, limits)
    except ImageReadError:
        dicom = None  # the 8-bit decode succeeded, so show that
    if dicom is None:
        return FullDepth(display.astype(np.uint16), 0.0, 1.0, None, "8-bit image")
    values = resize_to(dicom.values, display.shape)
    lo, hi = math.floor(float(values.min())), math.ceil(float(values.max()))
    slope = 1.0 if hi - lo <= 65535 else (hi - lo) / 65535.0
    stored = np.clip(np.rint((values - lo) / slope), 0, 65535).astype(np.uint16)
    window = None
    if dicom.window is not None:
        window = ((dicom.window[0] - lo) / slope, dicom.window[1] / slope)
    return FullDepth(stored, float(lo), slope, window, "DICOM")


def resize_to(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Float values resized (as `render.fit` does) to exactly `shape`, the display image's size,
    so that pixels, heat maps and the 8-bit display stay registered."""
    from PIL import Image

    h, w = int(shape[0]), int(shape[1])
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape[:2] == (h, w):
        return arr.astype(np.float64)
    out = Image.fromarray(arr, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float64)


def window_lut(stored: np.ndarray, centre: float, width: float, invert: bool = False) -> np.ndarray:
    """DICOM's LINEAR window (PS3.3 C.11.2.1.2) on stored values -> uint8; the page's LUT is the same."""
    x = np.asarray(stored, dtype=np.float64)
    if width > 1:
        y = (x - (centre - 0.5)) / (width - 1.0) + 0.5
    else:
        y = (x > centre - 0.5).astype(np.float64)
    out = np.clip(np.floor(y * 255.0 + 0.5), 0, 255).astype(np.uint8)
    return (255 - out) if invert else out


def default_window(full: FullDepth) -> tuple[float, float]:
    """The page's starting window: the DICOM's own, 0..255 as is for an 8-bit image, else full range."""
    if full.window is not None:
        return full.window
    if full.source == "8-bit image":
        return 128.0, 256.0
    lo, hi = float(full.stored.min()), float(full.stored.max())
    return (lo + hi + 1) / 2.0, max(2.0, hi - lo + 1)


def blend(gray: np.ndarray, heat: HeatLayer | None, opacity: float) -> np.ndarray:
    """`gray` (HxW uint8) with the heat layer at `opacity` x its alpha: at opacity 1 this is
    `inference.explain.overlay` of the same map."""
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float64)
    if heat is None or opacity <= 0 or heat.alpha <= 0:
        return base.astype(np.uint8)
    a = min(1.0, opacity) * heat.alpha
    return np.clip(np.floor((1.0 - a) * base + a * heat.rgb + 0.5), 0, 255).astype(np.uint8)


def cam_caption(finding: str, probability: float, threshold: float, positive: bool, has_evidence: bool) -> str:
    """The map's caption, worded from the map and the decision together (an empty map next
    to a positive decision says that the map cannot show where, not that nothing is there)."""
    p, t = f"{100 * probability:.1f}%", f"{100 * threshold:.1f}%"
    if has_evidence and positive:
        return f"Grad-CAM for {finding}: the coloured regions raised its score ({p}), above its threshold of {t}."
    if has_evidence:
        return (
            f"Grad-CAM for {finding}: the coloured regions raised its score ({p}), "
            f"though not up to its threshold of {t}."
        )
    if positive:
        return (
            f"Grad-CAM for {finding}: its score ({p}) is above its threshold of {t}, but the map singles out "
            "no region; this map cannot show where the finding is."
        )
    return f"Grad-CAM for {finding}: no region raised its score ({p}), which stays below its threshold of {t}."


def png16(stored: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored, dtype=np.uint16)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


# -- routes ------------------------------------------------------------------------------


class WindowOut(BaseModel):
    center: float
    width: float


class DisplayOut(BaseModel):
    width: int
    height: int
    source: str = Field(description='"DICOM" (modality values) or "8-bit image"')
    value_offset: float = Field(description="value = value_offset + value_slope x stored (pixels.png)")
    value_slope: float
    stored_min: int
    stored_max: int
    dicom_window: WindowOut | None = Field(description="the DICOM's own window, in stored units")
    pixels_url: str
    heat_url: str | None
    result_url: str
    report_url: str
    sr_url: str | None = Field(None, description="this model's DICOM SR of the findings (DICOM inputs only)")


def _full(item: Analysis) -> FullDepth:
    full = item.viewer.get(FULL)
    if full is None:  # an analysis stored without it: its 8-bit display image
        full = FullDepth(item.display.astype(np.uint16), 0.0, 1.0, None, "8-bit image")
        item.viewer[FULL] = full
    return full


async def _heat(rt: ServeRuntime, item: Analysis, finding: str) -> HeatLayer:
    from chestxray.inference.explain import overlay

    name = rt.check_finding(finding)  # 501 without Grad-CAM, 422 for an unknown finding
    layer = item.viewer.get(f"heat:{name}")
    if layer is not None:
        return layer
    async with rt.admitted():
        cam = await rt.heatmap(item.gray, name, {})
    heat = np.clip(resize_to(cam.heatmap, item.display.shape), 0.0, 1.0)
    rgb = overlay(np.zeros(heat.shape, np.uint8), heat, alpha=1.0)  # the colour map alone
    found = next((f for f in item.prediction.findings if f.finding == name), None)
    probability = found.probability if found else cam.probability
    threshold = found.threshold if found else float("nan")
    caption = cam_caption(name, probability, threshold, bool(found and found.positive), cam.has_evidence)
    from chestxray.inference.explain import DEFAULT_ALPHA

    layer = HeatLayer(rgb, DEFAULT_ALPHA if cam.has_evidence else 0.0, caption, render.png_bytes(rgb))
    item.viewer[f"heat:{name}"] = layer
    return layer


@router.get("/api/v1/viewer")
def viewer_config(request: Request) -> dict[str, bool]:
    """What this server offers the viewer beyond uploads: `studies` when it browses a PACS."""
    from starlette.routing import NoMatchFound

    try:
        request.app.url_path_for(STUDIES_ROUTE)
    except NoMatchFound:
        return {"studies": False}
    return {"studies": True}


@router.get("/api/v1/analyses/{analysis_id}/display", response_model=DisplayOut, responses=MISSING)
def display_info(analysis_id: str, rt: Runtime) -> DisplayOut:
    """How to read pixels.png: the stored values' range and meaning, and the DICOM's window."""
    item = rt.analysis(analysis_id)
    full = _full(item)
    base = f"/api/v1/analyses/{analysis_id}"
    return DisplayOut(
        width=int(full.stored.shape[1]),
        height=int(full.stored.shape[0]),
        source=full.source,
        value_offset=full.offset,
        value_slope=full.slope,
        stored_min=int(full.stored.min()),
        stored_max=int(full.stored.max()),
        dicom_window=WindowOut(center=full.window[0], width=full.window[1]) if full.window else None,
        pixels_url=f"{base}/pixels.png",
        heat_url=f"{base}/heat.png" if rt.has_cam else None,
        result_url=f"{base}/result.json",
        report_url=f"{base}/report.png",
        sr_url=f"{base}/sr.dcm" if item.viewer.get(SR_SOURCE) is not None else None,
    )


@router.get("/api/v1/analyses/{analysis_id}/pixels.png", response_class=Response, responses={**PNG, **MISSING})
def pixels(analysis_id: str, rt: Runtime) -> Response:
    """The analysed image as a 16-bit grayscale PNG (DICOM: modality values; see /display)."""
    return Response(png16(_full(rt.analysis(analysis_id)).stored), media_type="image/png")


@router.get("/api/v1/analyses/{analysis_id}/heat.png", response_class=Response, responses={**PNG, **MISSING})
async def heat_png(
    rt: Runtime, analysis_id: str, finding: str = Query(description="one of the model's labels")
) -> Response:
    """The Grad-CAM of `finding` in the overlay's colours, with `X-Grad-CAM-Alpha` (the blend
    of the server's overlay; 0 for a map with no evidence) and `X-Grad-CAM-Caption`."""
    layer = await _heat(rt, rt.analysis(analysis_id), finding)
    headers = {"X-Grad-CAM-Alpha": f"{layer.alpha:g}", "X-Grad-CAM-Caption": layer.caption}
    return Response(layer.png, media_type="image/png", headers=headers)


@router.get("/api/v1/analyses/{analysis_id}/result.json", responses=MISSING)
def result_json(analysis_id: str, rt: Runtime) -> JSONResponse:
    """The findings (as `predict --format json`) as a file to keep."""
    item = rt.analysis(analysis_id)
    body = {**item.prediction.to_dict(), "note": NOT_FOR_CLINICAL_USE}
    return JSONResponse(body, headers={"Content-Disposition": 'attachment; filename="chestxray-result.json"'})


@router.get(
    "/api/v1/analyses/{analysis_id}/sr.dcm",
    response_class=Response,
    responses={
        200: {"content": {"application/dicom": {}}, "description": "DICOM Comprehensive SR (Part 10)"},
        **MISSING,
        422: {"description": "not a DICOM input, or its header cannot make an SR"},
        501: {"description": "this server cannot build SRs (the pacs extra, or its model file, missing)"},
    },
)
async def result_sr(request: Request, rt: Runtime, analysis_id: str) -> Response:
    """The findings as this model's DICOM SR (TID 1500), for the study of the DICOM input:
    the same report `chestxray listen` and `dicomweb` store in a PACS."""
    reports: SrReports = request.app.state.sr_reports
    if not reports.available:
        raise HTTPException(501, "DICOM SRs need the pacs extra (pip install 'chestxray[pacs]') and the model file")
    item = rt.analysis(analysis_id)
    source = item.viewer.get(SR_SOURCE)
    if source is None:
        raise HTTPException(422, "a DICOM SR is made for DICOM inputs with study and instance UIDs only")
    try:
        data = await rt.decoder.run(reports.encode, source, item.prediction)
    except ChestXrayError as exc:
        raise HTTPException(422, f"cannot build the SR: {exc}") from None
    except Exception as exc:  # a header highdicom cannot copy (e.g. malformed patient module)
        raise HTTPException(422, f"cannot build the SR from this DICOM header ({type(exc).__name__})") from None
    return Response(
        data, media_type="application/dicom", headers={"Content-Disposition": 'attachment; filename="chestxray-sr.dcm"'}
    )


@router.get("/api/v1/analyses/{analysis_id}/report.png", response_class=Response, responses={**PNG, **MISSING})
async def report_png(
    rt: Runtime,
    analysis_id: str,
    finding: str | None = Query(None, description="the Grad-CAM to lay over the image"),
    center: float | None = Query(None, description="window centre, in the image's values (see /display)"),
    width: float | None = Query(None, gt=0, description="window width, in the image's values"),
    invert: bool = False,
    opacity: float = Query(1.0, ge=0.0, le=1.0),
) -> Response:
    """A one-page report: the image at the given window with the chosen overlay, the findings
    with their thresholds, the warnings and the not-for-clinical-use line."""
    from chestxray.serve.report_png import report_page

    item = rt.analysis(analysis_id)
    full = _full(item)
    c, w = default_window(full)
    if center is not None:
        c = (center - full.offset) / full.slope
    if width is not None:
        w = width / full.slope
    layer = await _heat(rt, item, finding) if finding else None
    image = blend(window_lut(full.stored, c, w, invert), layer, opacity)
    window_text = f"window centre {full.offset + c * full.slope:.6g}, width {w * full.slope:.6g}" + (
        ", inverted" if invert else ""
    )
    data = report_page(image, item.prediction, rt.analyzer.name, window_text, layer.caption if layer else None)
    return Response(
        data, media_type="image/png", headers={"Content-Disposition": 'attachment; filename="chestxray-report.png"'}
    )
