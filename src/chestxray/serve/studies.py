"""The viewer's Studies page, server side: a PACS's chest radiograph studies behind a small interface.

  GET  /api/v1/studies?date_from=&date_to=&accession=&offset=&limit=   recent CR/DX studies (QIDO-RS)
  GET  /api/v1/studies/{study}/image                                   its radiograph, DICOM Part 10 (WADO-RS)
  POST /api/v1/studies/{study}/results?analysis=ID&series=&sop=        this analysis as SR into the study (STOW-RS)

The page analyses a study by posting the fetched image to /api/v1/analyses like any upload, so the
upload path's limits and queue apply unchanged. The DICOMweb implementation of `StudySource` (QIDO,
WADO, the SR and STOW) and the records it returns belong to the PACS package
(`chestxray.pacs.studies`); this module defines only what the viewer needs.
Patient names reach the page only when the server was started to show them, and are never logged.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from chestxray.errors import ChestXrayError
from chestxray.pacs.studies import StudyImage, StudyQuery, StudyRow
from chestxray.serve.state import Runtime
from chestxray.serve.viewer_routes import STUDIES_ROUTE

if TYPE_CHECKING:
    from chestxray.inference.predict import Prediction

DATE = re.compile(r"^\d{8}$")
ACCESSION = re.compile(r"^[A-Za-z0-9 ._\-]{1,16}$")  # DICOM SH, with no QIDO wildcard (* ?)
__all__ = ["StudyImage", "StudyQuery", "StudyRow", "StudySource", "studies_router"]
UID = re.compile(r"^[0-9.]{1,64}$")


class StudySource(Protocol):
    """What the Studies page needs of a PACS. Methods block (the routes run them in threads)
    and raise ChestXrayError, with a message fit for the user, when the PACS fails."""

    def search(self, query: StudyQuery) -> tuple[list[StudyRow], bool]:
        """One page of CR/DX studies, newest first, and whether more follow."""
        ...

    def fetch_image(self, study_uid: str) -> StudyImage | None:
        """The study's first CR/DX image, or None when it has none."""
        ...

    def send_results(self, study_uid: str, series_uid: str, sop_uid: str, prediction: Prediction) -> str:
        """Store `prediction` of that image as this model's SR in the study; its SOP Instance UID."""
        ...


def _check(value: str | None, pattern: re.Pattern[str], field: str, what: str) -> str | None:
    if value is not None and not pattern.match(value):
        raise HTTPException(422, f"{field}: expected {what}")
    return value


async def _pacs(call: Any, *args: Any) -> Any:
    try:
        return await run_in_threadpool(call, *args)
    except ChestXrayError as exc:
        raise HTTPException(502, f"the PACS did not answer as expected: {exc}") from None


def studies_router(source: StudySource, *, show_patient_names: bool = False) -> APIRouter:
    """The Studies routes over `source`; `create_app` includes them when `serve --dicomweb` is given."""
    router = APIRouter(tags=["studies"])

    @router.get("/api/v1/studies", name=STUDIES_ROUTE)
    async def list_studies(
        date_from: str | None = Query(None, description="YYYYMMDD, inclusive"),
        date_to: str | None = Query(None, description="YYYYMMDD, inclusive"),
        accession: str | None = Query(None, description="accession number, exact"),
        offset: int = Query(0, ge=0),
        limit: int = Query(20, ge=1, le=100),
    ) -> dict[str, Any]:
        """The PACS's chest radiograph studies, newest first, searchable by date and accession only."""
        query = StudyQuery(
            _check(date_from, DATE, "date_from", "YYYYMMDD"),
            _check(date_to, DATE, "date_to", "YYYYMMDD"),
            _check(accession, ACCESSION, "accession", "up to 16 letters, digits, space, dot, dash or underscore"),
            offset,
            limit,
        )
        rows, more = await _pacs(source.search, query)
        out = [asdict(r) if show_patient_names else {**asdict(r), "patient_name": None} for r in rows]
        return {"studies": out, "offset": offset, "limit": limit, "more": bool(more)}

    @router.get("/api/v1/studies/{study_uid}/image", response_class=Response)
    async def study_image(study_uid: str) -> Response:
        """The study's radiograph as DICOM Part 10; headers X-Series-UID and X-SOP-UID name it."""
        _check(study_uid, UID, "study", "a DICOM UID")
        image = await _pacs(source.fetch_image, study_uid)
        if image is None:
            raise HTTPException(404, "the study has no CR or DX image")
        headers = {"X-Series-UID": image.series_uid, "X-SOP-UID": image.sop_uid}
        return Response(image.data, media_type="application/dicom", headers=headers)

    @router.post("/api/v1/studies/{study_uid}/results")
    async def send_results(
        rt: Runtime,
        study_uid: str,
        analysis: str = Query(description="the analysis of the study's image"),
        series: str = Query(description="X-Series-UID of the image"),
        sop: str = Query(description="X-SOP-UID of the image"),
    ) -> dict[str, str]:
        """Send an analysis of the study's image back to the PACS as this model's SR."""
        for value, field in ((study_uid, "study"), (series, "series"), (sop, "sop")):
            _check(value, UID, field, "a DICOM UID")
        item = rt.analysis(analysis)
        sent = await _pacs(source.send_results, study_uid, series, sop, item.prediction)
        return {"sr_sop_instance_uid": str(sent)}

    return router
