"""The work behind the listener and the DICOMweb client: screen incoming instances, spool
them, analyse them in batches through the `Engine`, write the results into the spool, send
them with retries, and journal every step (see spool.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset

from chestxray.io import atomic_write_bytes
from chestxray.pacs.engine import Cam, Engine
from chestxray.pacs.metrics import PacsMetrics
from chestxray.pacs.results import SrFactory, build_results
from chestxray.pacs.send import Sender, SendError
from chestxray.pacs.spool import Entry, Spool, short_hash

if TYPE_CHECKING:
    from chestxray.inference.predict import Prediction

log = logging.getLogger("chestxray.pacs")

RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE", "LO"}
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO")


def screen(ds: Dataset) -> tuple[str, str] | None:
    """(counter label, one-line reason) when `ds` is not a frontal chest radiograph; None to analyse.
    Quotes only the SOP class, ViewPosition and BodyPartExamined: nothing about the patient."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in RADIOGRAPH_SOP_CLASSES:
        name = getattr(pydicom.uid.UID(sop), "name", sop) if sop else "none"
        return "sop_class", f"not a CR/DX radiograph (SOP class {name})"
    if "PixelData" not in ds:
        return "no_pixels", "no pixel data"
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        return "view", f"not a frontal view (ViewPosition {view[:16]})"
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part and not any(c in part for c in CHEST_PARTS):
        return "body_part", f"not a chest (BodyPartExamined {part[:16]})"
    return None


@dataclass
class RetryPolicy:
    attempts: int = 8  # sends before an instance goes to failed/
    base: float = 2.0  # seconds before the 2nd attempt; doubles each time
    cap: float = 300.0

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.base * 2 ** max(0, attempt - 1))


class Processor:
    """One model, one spool, one destination."""

    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        sender: Sender,
        *,
        cam: bool = False,
        metrics: PacsMetrics | None = None,
        retry: RetryPolicy | None = None,
        batch_size: int = 16,
        batch_wait: float = 0.25,
        keep_days: float = 0.0,
        workers: int | None = None,
    ) -> None:
        self.engine, self.spool, self.sender = engine, spool, sender
        self.workers = workers  # decoder processes while `working()` (None: `Engine.decoders` decides)
        self.cam = cam
        self.metrics = metrics or PacsMetrics()
        self.retry = retry or RetryPolicy()
        self.batch_size, self.batch_wait = batch_size, batch_wait
        self.keep_days, self.keep = keep_days, keep_days > 0
        self._purged = 0.0
        self.wake = threading.Event()
        self.reports = SrFactory(engine.info)
        self.reports.warm()

    # ---- intake ----------------------------------------------------------------------------

    def skip(self, uid: str, label: str, reason: str) -> None:
        log.info("skipped %s: %s", short_hash(uid), reason)
        self.metrics.skipped.labels(label).inc()
        self.spool.record_skip(uid, reason)

    def receive(self, ds: Dataset, encoded: bytes) -> None:
        """An instance arrived (already parsed as `ds`, bytes as received): screened, then
        spooled durably before the sender gets its success status."""
        uid = str(ds.SOPInstanceUID)
        self.metrics.received.inc()
        verdict = screen(ds)
        if verdict is not None:
            if not self.spool.seen(uid):
                self.skip(uid, *verdict)
            return
        if self.spool.receive(uid, encoded):
            log.info("received %s", short_hash(uid))
            self.wake.set()
        else:
            log.info("received %s again: already handled, not repeated", short_hash(uid))

    # ---- work -------------------------------------------------------------------------------

    def step(self) -> bool:
        """Analyse one batch and send what is due; True when something was done."""
        did = self.analyse_batch()
        return self.send_due() or did

    def analyse_batch(self) -> bool:
        entries = self.spool.entries("received", limit=self.batch_size)
        if not entries:
            return False
        if len(entries) < self.batch_size and time.time() - entries[-1].received < self.batch_wait:
            time.sleep(self.batch_wait)  # a burst is arriving: fill the batch
            entries = self.spool.entries("received", limit=self.batch_size)
        loaded: list[tuple[Entry, Path, Dataset]] = []
        for e in entries:
            path = self.spool.incoming(e.key)
            try:
                header: Dataset = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # a torn or unreadable spool file: reported, the others go on
                self.skip(e.uid, "unreadable", f"cannot read the spooled instance ({type(exc).__name__})")
                continue
            loaded.append((e, path, header))
        if self.cam:
            for e, path, head in loaded:
                try:
                    prediction, cams = self.engine.explain(path.read_bytes(), short_hash(e.uid))
                except Exception as exc:  # ImageReadError and decoder failures: skip this one only
                    reason = getattr(exc, "reason", None) or f"cannot read this image ({type(exc).__name__})"
                    self.skip(e.uid, "unreadable", reason)
                    continue
                self._finish(e, head, prediction, cams)
        elif loaded:
            predictions = self.engine.analyse([f for _, f, _ in loaded], [short_hash(e.uid) for e, _, _ in loaded])
            for (e, _, head), prediction in zip(loaded, predictions, strict=True):
                self._finish(e, head, prediction, [])
        return True

    def _finish(self, e: Entry, header: Dataset, prediction: "Prediction", cams: Sequence[Cam]) -> None:
        if not prediction.ok:
            self.skip(e.uid, "unreadable", prediction.error or "unreadable")
            return
        failed = self.engine.failed_input_check(prediction)
        if failed:
            self.skip(e.uid, "input_check", f"failed the input check: {failed}")
            return
        try:
            results = build_results(header, prediction, self.reports, cams)
        except Exception as exc:  # a header highdicom cannot copy (e.g. missing study UID)
            self.skip(e.uid, "header", f"cannot build results from this header ({type(exc).__name__}: {exc})"[:300])
            return
        folder = self.spool.results_dir(e.key)
        for i, ds in enumerate(results):
            atomic_write_bytes(folder / f"{i:03d}.dcm", ds)
        self.spool.mark_analysed(e.uid)
        self.metrics.analysed.inc()
        positives = ", ".join(f.finding for f in prediction.positives) or "none"
        log.info("analysed %s: positive %s; %d result object(s)", short_hash(e.uid), positives, len(results))

    def send_due(self) -> bool:
        if self.keep and time.time() - self._purged > 3600:  # --keep-days: hourly, and at start
            self._purged = time.time()
            self.spool.purge(self.keep_days)
        entries = self.spool.entries("analysed", limit=64, due=True)
        if not entries:
            return False
        files: list[Path] = []
        for e in entries:
            files += self.spool.result_files(e.key)
        try:
            self.sender.send(files)
        except SendError as exc:
            self._failed_send(entries, str(exc))
            return True
        except Exception as exc:  # any other failure of the network stack: retried the same way
            self._failed_send(entries, f"send failed ({type(exc).__name__})")
            return True
        now = time.time()
        for e in entries:
            self.spool.mark_sent(e.uid, keep=self.keep)
            self.metrics.latency.observe(max(0.0, now - e.received))
        self.metrics.sent.inc(len(files))
        log.info("sent %d result object(s) of %d instance(s) to %s", len(files), len(entries), self.sender.describe())
        return True

    def _failed_send(self, entries: Sequence[Entry], reason: str) -> None:
        for e in entries:
            attempt = e.attempts + 1
            if attempt >= self.retry.attempts:
                self.spool.mark_failed(e.uid, f"gave up after {attempt} attempts: {reason}")
                self.metrics.failed.inc()
                log.error("failed %s: %s (moved to failed/)", short_hash(e.uid), reason)
            else:
                delay = self.retry.delay(attempt)
                self.spool.retry_later(e.uid, attempt, delay, reason)
                self.metrics.retries.inc()
                log.warning("send of %s failed (%s); retry %d in %.0f s", short_hash(e.uid), reason, attempt, delay)

    def pending(self) -> int:
        counts = self.spool.counts()
        return counts.get("received", 0) + counts.get("analysed", 0)

    def working(self) -> AbstractContextManager[None]:
        """While open, instances are decoded in worker processes started once (see `workers`);
        outside, in this process. With `cam`, each image is explained here, one at a time."""
        return self.engine.decoders(0 if self.cam else self.workers)

    def run(self, stop: threading.Event, idle: float = 0.5) -> None:
        """Work until `stop` is set: analysis in this thread, sending in another (so a slow
        destination does not hold up analysis); the steps in progress finish, the rest stays
        journaled."""
        sent = threading.Event()
        sender = threading.Thread(target=self._loop, args=(self.send_due, stop, sent, idle), name="pacs-send")
        sender.start()
        try:
            with self.working():
                self._loop(self.analyse_batch, stop, self.wake, idle, then=sent)
        finally:
            sent.set()
            sender.join()

    @staticmethod
    def _loop(
        work: Callable[[], bool],
        stop: threading.Event,
        wake: threading.Event,
        idle: float,
        then: threading.Event | None = None,
    ) -> None:
        while not stop.is_set():
            try:
                busy = work()
            except Exception:  # the loop must not die; the journal keeps the work for the next try
                log.exception("processing step failed; retrying")
                busy = False
            if busy and then is not None:
                then.set()  # results are ready: wake the sender
            if not busy:
                wake.wait(idle)
                wake.clear()
