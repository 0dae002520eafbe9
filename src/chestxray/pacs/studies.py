"""A PACS's chest radiograph studies for the viewer's Studies page, over DICOMweb: QIDO-RS to
list them (and to see whether this model's SR is there), WADO-RS to fetch a radiograph and its
header, the report builder and STOW-RS to store the findings in the study.

The record types are plain data (no extra needed), so the server can describe studies from any
source; `DicomwebStudies` needs the pacs extra. Nothing here logs a patient attribute.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from chestxray.inference.predict import Prediction
    from chestxray.pacs.engine import ModelInfo

RADIOGRAPH_MODALITIES = ("CR", "DX")
MAX_LISTED = 2000  # studies read per search: QIDO-RS cannot sort, so they are sorted here
# Besides the patient and study modules: what an SR needs of its source (PS3.3 C.17.2, C.12.1).
SR_SOURCE_EXTRA = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class StudyQuery:
    date_from: str | None = None  # YYYYMMDD, inclusive
    date_to: str | None = None
    accession: str | None = None  # exact
    offset: int = 0
    limit: int = 20


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    date: str
    accession: str
    description: str
    images: int | None  # CR/DX instances, when the PACS says
    has_result: bool  # this model's SR is already in the study
    patient_name: str | None = None  # only shown with --show-patient-names


@dataclass(frozen=True)
class StudyImage:
    data: bytes  # DICOM Part 10 of the study's first CR/DX instance
    series_uid: str
    sop_uid: str


def sr_series_uid(study_uid: str, model_sha256: str) -> str:
    """The series this model's SR of a study goes into (results.py builds it so)."""
    from chestxray.pacs.parts import result_uid

    return result_uid(study_uid, model_sha256, "sr series")


def sr_source(ds: Dataset) -> Dataset:
    """Of a source header, only what its SR copies: patient and study modules and the UIDs
    (the viewer keeps this, not the image's bytes, to build an SR later)."""
    from pydicom.dataset import Dataset

    from chestxray.pacs.parts import PATIENT_STUDY

    out = Dataset()
    for keyword in (*SR_SOURCE_EXTRA, *PATIENT_STUDY):
        if keyword in ds:
            out[keyword] = ds[keyword]
    return out


def sr_source_of_bytes(data: bytes) -> Dataset | None:
    """`sr_source` of a DICOM file's header, or None when it is not DICOM or lacks the UIDs."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        out = sr_source(ds)
        missing = [k for k in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID") if not str(out.get(k, ""))]
    except Exception:  # not DICOM, or a header pydicom cannot read: no SR for it
        return None
    return None if missing else out


class SrMaker:
    """This model's SR of one source as Part 10 bytes; the factory's template is shared state."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self._lock = threading.Lock()
        self._factory: Any = None

    def encode(self, source: Dataset, prediction: Prediction) -> bytes:
        from chestxray.pacs.results import SrFactory

        with self._lock:
            if self._factory is None:
                self._factory = SrFactory(self.info)
            return bytes(self._factory.encode(source, prediction))


def _value(attrs: dict, tag: str) -> Any:
    values = attrs.get(tag, {}).get("Value") or [None]
    return values[0]


def _text(attrs: dict, tag: str) -> str:
    value = _value(attrs, tag)
    return "" if value is None else str(value)


def _person(attrs: dict) -> str:
    name = _value(attrs, "00100010")
    alphabetic = str(name.get("Alphabetic", "")) if isinstance(name, dict) else str(name or "")
    family, _, rest = alphabetic.partition("^")
    given = " ".join(p for p in rest.split("^") if p)
    return f"{family}, {given}" if family and given else family or given


class DicomwebStudies:
    """The viewer's `StudySource` over a DICOMweb server (the pacs package's client)."""

    def __init__(
        self,
        url: str,
        info: ModelInfo,
        auth_env: str | None = None,
        *,
        patient_names: bool = False,
        max_listed: int = MAX_LISTED,
    ) -> None:
        from chestxray.pacs.send import StowSender

        self.stow = StowSender(url, auth_env)
        self.client = self.stow.client
        self.info, self.patient_names, self.max_listed = info, patient_names, max_listed
        self.reports = SrMaker(info)

    def _call(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A DICOMweb call; its failure as one line naming the step and the status, never the
        server's answer (it may quote patient data) or the credentials."""
        import requests

        try:
            return call(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise ChestXrayError(f"{what} failed (HTTP {status})") from None
        except (requests.RequestException, OSError, ValueError) as exc:
            raise ChestXrayError(f"{what} failed ({type(exc).__name__})") from None

    def search(self, query: StudyQuery) -> tuple[list[StudyRow], bool]:
        filters: dict[str, str] = {"ModalitiesInStudy": ",".join(RADIOGRAPH_MODALITIES)}
        if query.date_from or query.date_to:
            filters["StudyDate"] = f"{query.date_from or ''}-{query.date_to or ''}"
        if query.accession:
            filters["AccessionNumber"] = query.accession
        found = self._call(
            "QIDO-RS search for studies",
            self.client.search_for_studies,
            search_filters=filters,
            fields=["StudyDescription"],
            limit=self.max_listed,
        )
        found.sort(key=lambda s: (_text(s, "00080020"), _text(s, "00080030"), _text(s, "0020000D")), reverse=True)
        page = found[query.offset : query.offset + query.limit]
        more = len(found) > query.offset + query.limit
        series = self._series_of([_text(s, "0020000D") for s in page])
        rows = []
        for s in page:
            uid = _text(s, "0020000D")
            ours = sr_series_uid(uid, self.info.sha256)
            of_study = series.get(uid, [])
            counts = [_value(x, "00201209") for x in of_study if _text(x, "00080060") in RADIOGRAPH_MODALITIES]
            rows.append(
                StudyRow(
                    study_uid=uid,
                    date=_text(s, "00080020"),
                    accession=_text(s, "00080050"),
                    description=_text(s, "00081030"),
                    images=sum(int(c) for c in counts) if counts and None not in counts else None,
                    has_result=any(_text(x, "0020000E") == ours for x in of_study),
                    patient_name=_person(s) if self.patient_names else None,
                )
            )
        return rows, more

    def _series_of(self, studies: list[str]) -> dict[str, list[dict]]:
        """The series of these studies, in one QIDO-RS request (a list of UIDs)."""
        if not studies:
            return {}
        found = self._call(
            "QIDO-RS search for series",
            self.client.search_for_series,
            search_filters={"StudyInstanceUID": ",".join(studies)},
            fields=["NumberOfSeriesRelatedInstances"],
            get_remaining=True,
        )
        out: dict[str, list[dict]] = {}
        for s in found:
            out.setdefault(_text(s, "0020000D"), []).append(s)
        return out

    def fetch_image(self, study_uid: str) -> StudyImage | None:
        import pydicom

        from chestxray.pacs.service import LATERAL_VIEWS, RADIOGRAPH_SOP_CLASSES

        found = self._call(
            "QIDO-RS search for instances",
            self.client.search_for_instances,
            study_instance_uid=study_uid,
            fields=["ViewPosition"],
            get_remaining=True,
        )
        images = [i for i in found if _text(i, "00080016") in RADIOGRAPH_SOP_CLASSES]
        if not images:
            return None
        # A frontal view first (a PACS that does not return ViewPosition: the first image).
        images.sort(key=lambda i: (_text(i, "00185101").upper() in LATERAL_VIEWS, int(_value(i, "00200013") or 0)))
        series, sop = _text(images[0], "0020000E"), _text(images[0], "00080018")
        ds = self._call("WADO-RS retrieve", self.client.retrieve_instance, study_uid, series, sop)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        return StudyImage(buf.getvalue(), series, sop)

    def source_header(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        """The image's header (WADO-RS metadata, no pixels), as much as its SR needs."""
        from pydicom.dataset import Dataset

        attrs = self._call("WADO-RS metadata", self.client.retrieve_instance_metadata, study_uid, series_uid, sop_uid)
        attrs = {k: v for k, v in attrs.items() if "BulkDataURI" not in v and "InlineBinary" not in v}
        header = sr_source(Dataset.from_json(attrs))
        if str(header.get("StudyInstanceUID", "")) != study_uid:
            raise ChestXrayError("WADO-RS metadata: the instance is not in this study")
        return header

    def send_results(self, study_uid: str, series_uid: str, sop_uid: str, prediction: Prediction) -> str:
        import pydicom

        from chestxray.pacs.send import SendError

        header = self.source_header(study_uid, series_uid, sop_uid)
        try:
            data = self.reports.encode(header, prediction)
        except Exception as exc:  # a header highdicom cannot copy
            raise ChestXrayError(f"cannot build the SR from this image's header ({type(exc).__name__})") from None
        sr = pydicom.dcmread(io.BytesIO(data))
        try:
            self.stow.store([sr])
        except SendError as exc:
            raise ChestXrayError(str(exc)) from None
        return str(sr.SOPInstanceUID)
