"""The one-page viewer: `/` and its static files (served from this package, nothing from the internet)."""

from __future__ import annotations

import html
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.serve.state import Runtime

STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

router = APIRouter(include_in_schema=False)


@cache
def static_files() -> dict[str, bytes]:
    root = files("chestxray.serve").joinpath("static")
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and not f.name.startswith(".")}


@router.get("/", response_class=HTMLResponse)
def index(rt: Runtime) -> HTMLResponse:
    page = (
        static_files()["index.html"]
        .decode("utf-8")
        .replace("{{MODEL}}", html.escape(rt.analyzer.name))
        .replace("{{NOTE}}", html.escape(NOT_FOR_CLINICAL_USE))
        .replace("{{MAX_UPLOAD_MIB}}", f"{rt.settings.max_upload_bytes / 2**20:.4g}")
    )
    return HTMLResponse(page)


@router.get("/static/cam-legend.png")
def cam_legend(rt: Runtime) -> Response:
    """The overlay's colour scale, drawn by the same `overlay` function as the CAMs."""
    if not rt.has_cam:
        raise HTTPException(404, "not found")
    return Response(rt.legend(), media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    data = static_files().get(name) if name != "index.html" else None
    suffix = name[name.rfind(".") :] if "." in name else ""
    if data is None or suffix not in STATIC_TYPES:
        raise HTTPException(404, "not found")
    return Response(data, media_type=STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"})
