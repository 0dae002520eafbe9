"""The DICOMweb client workflow: QIDO-RS to find a study's chest radiographs, WADO-RS to
fetch them, the `Processor` to analyse them, STOW-RS (its sender) to post the results into
the same study. A study that already holds this model's SR is not analysed again."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from chestxray.pacs.parts import result_uid
from chestxray.pacs.service import RADIOGRAPH_SOP_CLASSES, Processor, screen
from chestxray.pacs.spool import short_hash

log = logging.getLogger("chestxray.pacs")

SR_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
TAGS = {"study": "0020000D", "series": "0020000E", "sop": "00080018", "sop_class": "00080016", "date": "00080020"}


def _value(attrs: dict, tag: str) -> str:
    values = attrs.get(tag, {}).get("Value") or [""]
    return str(values[0])


@dataclass
class StudyPlan:
    study: str
    instances: list[tuple[str, str]] = field(default_factory=list)  # (series, sop) of CR/DX instances
    done_before: bool = False  # this model's SR is already there


class DicomwebRun:
    def __init__(self, client: Any, processor: Processor | None, model_sha256: str, force: bool = False) -> None:
        self.client, self.processor, self.sha, self.force = client, processor, model_sha256, force

    def studies_since(self, since: str) -> list[str]:
        found = self.client.search_for_studies(search_filters={"StudyDate": f"{since}-"}, get_remaining=True)
        return [_value(s, TAGS["study"]) for s in found]

    def plan(self, study: str) -> StudyPlan:
        out = StudyPlan(study)
        our_series = result_uid(study, self.sha, "sr series")
        for attrs in self.client.search_for_instances(study_instance_uid=study, get_remaining=True):
            sop_class, series = _value(attrs, TAGS["sop_class"]), _value(attrs, TAGS["series"])
            if sop_class in SR_SOP_CLASSES and series == our_series:
                out.done_before = True
            elif sop_class in RADIOGRAPH_SOP_CLASSES:
                out.instances.append((series, _value(attrs, TAGS["sop"])))
        return out

    def fetch(self, plan: StudyPlan) -> int:
        """WADO-RS each instance of `plan` into the processor (screened and spooled there)."""
        assert self.processor is not None  # not a user input: a dry run never fetches
        n = 0
        for series, sop in plan.instances:
            ds: Dataset = self.client.retrieve_instance(plan.study, series, sop)
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            if screen(ds) is None:
                n += 1
            self.processor.receive(ds, buf.getvalue())
        return n

    def run(self, studies: Iterable[str], dry_run: bool = False, out: Any = None) -> dict[str, int]:
        counts = {"studies": 0, "skipped_done": 0, "instances": 0}
        for study in studies:
            plan = self.plan(study)
            counts["studies"] += 1
            label = short_hash(study)
            if plan.done_before and not self.force:
                counts["skipped_done"] += 1
                log.info("study %s already has this model's SR: skipped (--force to redo)", label)
                continue
            if dry_run:
                print(f"study {label}: {len(plan.instances)} CR/DX instance(s) would be analysed", file=out)
                counts["instances"] += len(plan.instances)
                continue
            counts["instances"] += self.fetch(plan)
        if not dry_run:
            self.drain()
        return counts

    def drain(self, timeout: float | None = None) -> None:
        """Step the processor until nothing is left that can be done now."""
        assert self.processor is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.processor.working():
            while True:
                busy = self.processor.step()
                if not busy:
                    if self.processor.spool.entries("received", limit=1):
                        continue
                    due_later = self.processor.spool.entries("analysed", limit=1)
                    if not due_later or (deadline is not None and time.monotonic() > deadline):
                        return
                    time.sleep(0.5)  # a failed send waits for its retry


def watch(run: DicomwebRun, since: str, every: float, stop: threading.Event) -> None:
    """Poll for studies since `since` every `every` seconds until `stop` is set."""
    while not stop.is_set():
        run.run(run.studies_since(since))
        stop.wait(every)
