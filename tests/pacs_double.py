"""An in-memory `StudySource` for the Studies page's tests (the DICOMweb one is tested against Orthanc)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chestxray.errors import ChestXrayError
from chestxray.serve.studies import StudyImage, StudyQuery, StudyRow


@dataclass
class MemoryPacs:
    rows: list[StudyRow]
    images: dict[str, StudyImage]
    sent: list[tuple[str, str, str, object]] = field(default_factory=list)
    queries: list[StudyQuery] = field(default_factory=list)
    down: bool = False

    def search(self, query: StudyQuery) -> tuple[list[StudyRow], bool]:
        if self.down:
            raise ChestXrayError("connection refused")
        self.queries.append(query)
        rows = [
            r
            for r in self.rows
            if (query.date_from is None or r.date >= query.date_from)
            and (query.date_to is None or r.date <= query.date_to)
            and (query.accession is None or r.accession == query.accession)
        ]
        rows.sort(key=lambda r: r.date, reverse=True)
        return rows[query.offset : query.offset + query.limit], len(rows) > query.offset + query.limit

    def fetch_image(self, study_uid: str) -> StudyImage | None:
        return self.images.get(study_uid)

    def send_results(self, study_uid: str, series_uid: str, sop_uid: str, prediction: object) -> str:
        self.sent.append((study_uid, series_uid, sop_uid, prediction))
        uid = f"1.2.3.{len(self.sent)}"
        self.rows = [
            StudyRow(**{**r.__dict__, "has_result": True}) if r.study_uid == study_uid else r for r in self.rows
        ]
        return uid
