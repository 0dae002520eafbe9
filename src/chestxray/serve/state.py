"""What the routers share, kept on `app.state.runtime`: the model, the limits and the
machinery that keeps the server within them, with the steps every upload goes through
(receive, admit, decode, predict, Grad-CAM), each bounded and timed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response

from chestxray.data.images import DecodeLimitError, DecodeLimits, read_image, sniff_image_format
from chestxray.errors import ChestXrayError, ImageReadError
from chestxray.inference.predict import Prediction
from chestxray.serve import render
from chestxray.serve.metrics import ServeMetrics
from chestxray.serve.runtime import Admission, Batcher, Busy, DecodePool, Receiving, ServeSettings
from chestxray.serve.store import Analysis, ResultStore
from chestxray.serve.uploads import UploadError, check_upload_headers, read_file_field

if TYPE_CHECKING:
    from chestxray.inference.explain import CamResult

T = TypeVar("T")
ECHO_CHARS = 40  # longest client value quoted back in an error message
UPLOAD_NAME = "upload"  # what predictions call every upload; the client's file name is never used
CAM_NOTE_HEADER = "X-Grad-CAM-Note"


def shorten(value: str, limit: int = ECHO_CHARS) -> str:
    """A client value as error messages may quote it: at most `limit` characters."""
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


def decode_upload(data: bytes, limits: DecodeLimits | None = None, max_dicom_elements: int | None = None) -> np.ndarray:
    """Upload bytes -> HxW uint8, or an UploadError with a 4xx status that says why
    (413 when the image would decode past `limits.max_bytes`)."""
    return _decode(data, limits, max_dicom_elements)[0]


def _decode(data: bytes, limits: DecodeLimits | None, max_dicom_elements: int | None) -> tuple[np.ndarray, list[str]]:
    """The image and the warnings of its DICOM header (lateral view, not chest)."""
    from chestxray.inference.input_check import dicom_warnings

    if not data:
        raise UploadError(400, "the file is empty")
    try:
        kind = sniff_image_format(data[:132])
        # Some systems write DICOM datasets without the 128-byte preamble and "DICM":
        # such bytes are tried as DICOM before being refused (the CLI does so by the .dcm suffix).
        name = UPLOAD_NAME + ".dcm" if kind in (None, "dicom") else UPLOAD_NAME
        # The header is read first, with a bound on its elements, so a header bomb costs little.
        notes = dicom_warnings(data, name, max_elements=max_dicom_elements)
        if kind is None:
            try:
                return read_image(data, name=name, limits=limits), notes
            except DecodeLimitError:
                raise
            except ImageReadError:
                raise UploadError(415, "not a PNG, JPEG or DICOM image") from None
        return read_image(data, name=UPLOAD_NAME, limits=limits), notes
    except DecodeLimitError as exc:
        raise UploadError(413, f"image too large to decode: {exc.reason}") from None
    except ImageReadError as exc:
        raise UploadError(422, f"cannot read the image: {exc.reason}") from None


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class ServeRuntime:
    """One per app: the analyzer, the settings, admission, the pools and the result store."""

    def __init__(
        self,
        analyzer: Any,
        settings: ServeSettings,
        *,
        result_ttl_s: float,
        store_max_bytes: int,
        display_max_side: int,
    ) -> None:
        self.analyzer = analyzer
        self.settings = settings
        self.labels = list(analyzer.labels)
        self.backend = str(analyzer.backend.name)
        from chestxray.inference.explain import check_cam_support

        try:  # torch models, and ONNX files exported with the class activation maps
            check_cam_support(analyzer)
            self.has_cam = True
        except ChestXrayError:
            self.has_cam = False
        self.display_max_side = display_max_side
        self.store = ResultStore(ttl_s=result_ttl_s, max_bytes=store_max_bytes)
        self.metrics = ServeMetrics(analyzer.name, self.backend)
        self.admission = Admission(settings.queue_length, on_change=self.metrics.queue_depth.set)
        self.receiving = Receiving(settings.max_receiving, settings.max_receiving_per_client)
        self.decoder = DecodePool(settings.decode_threads)
        self.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chestxray-infer")
        self.lock = threading.Lock()  # the torch model and its Grad-CAM hooks are shared state
        # Big images are decoded at a fraction of their size that still covers the display
        # and the model input; the budget is judged from the header before decoding.
        self.limits = DecodeLimits(
            max_bytes=settings.max_decode_bytes, reduce_to=max(display_max_side, int(analyzer.preprocessing.size))
        )
        self.batcher: Batcher[np.ndarray, Prediction] = Batcher(
            self._predict_many,
            self.inference,
            settings.max_batch,
            settings.max_wait_ms / 1000.0,
            on_batch=self.metrics.batch_size.observe,
        )
        self._legend: bytes | None = None

    def _predict_many(self, grays: list[np.ndarray]) -> list[Prediction]:
        # Through Analyzer.predict, so a batch gets exactly what the CLI and the API give.
        with self.lock:
            return self.analyzer.predict(grays, names=[UPLOAD_NAME] * len(grays))

    # -- the steps of an upload ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A place among the requests that decode or run inference, or 503 at once."""
        try:
            self.admission.enter()
        except Busy:
            self.metrics.rejections.labels(reason="queue_full").inc()
            raise
        try:
            yield
        finally:
            self.admission.leave()

    async def receive(self, request: Request) -> bytes:
        """The upload's bytes, read before any compute slot is taken: header checks (413,
        415) first, then a receiving place (503 when full), then the body at a minimum rate."""
        s = self.settings
        head = request.headers
        check_upload_headers(head.get("content-type"), head.get("content-length"), s.max_upload_bytes)
        client = client_address(request)
        busy = self.receiving.refusal(client)
        if busy is not None:
            self.metrics.rejections.labels(reason="receiving_full").inc()
            raise Busy(busy)
        with self.receiving.receiving(client):
            return await self.timed(
                request.state.timings,
                "read",
                read_file_field(
                    head.get("content-type"),
                    head.get("content-length"),
                    request.stream(),
                    s.max_upload_bytes,
                    timeout_s=s.body_timeout_s,
                    min_rate=s.min_receive_rate,
                    grace_s=s.receive_grace_s,
                ),
            )

    async def timed(self, timings: dict[str, float], stage: str, work: Awaitable[T]) -> T:
        t = time.perf_counter()
        try:
            return await work
        finally:
            timings[stage] = time.perf_counter() - t
            self.metrics.stage.labels(stage=stage).observe(timings[stage])

    async def within_deadline(self, work: Awaitable[T]) -> T:
        deadline = self.settings.request_deadline_s
        try:
            return await asyncio.wait_for(work, deadline)
        except asyncio.TimeoutError:
            self.metrics.rejections.labels(reason="deadline").inc()
            raise Busy(f"the server could not answer within {deadline:g} s; retry shortly") from None

    def _decode(self, data: bytes) -> tuple[np.ndarray, list[str]]:
        try:
            return _decode(data, self.limits, self.settings.max_dicom_elements)
        except UploadError as exc:
            reason = {413: "decode_limit", 415: "not_an_image"}.get(exc.status, "unreadable")
            self.metrics.decode_refusals.labels(reason=reason).inc()
            raise

    async def decode(self, data: bytes, timings: dict[str, float]) -> tuple[np.ndarray, list[str]]:
        """Off the event loop (header included) and within the request deadline."""
        return await self.within_deadline(self.timed(timings, "decode", self.decoder.run(self._decode, data)))

    async def predict(self, gray: np.ndarray, timings: dict[str, float]) -> Prediction:
        result = await self.within_deadline(self.timed(timings, "inference", self.batcher.submit(gray)))
        if result.error:  # not expected for a decoded array; never answer with a half result
            raise UploadError(422, f"cannot analyse the image: {result.error}")
        return result

    def check_finding(self, finding: str) -> str:
        if not self.has_cam:
            raise HTTPException(
                501, f"this {self.backend} model gives no Grad-CAM maps (an ONNX file needs a 'cam' output)"
            )
        from chestxray.inference.explain import resolve_findings

        try:  # exact, case-insensitive or NIH spelling ("Infiltrate"); unknown -> ChestXrayError
            index = resolve_findings(self.labels, [finding])[0]  # type: ignore[index]
        except ChestXrayError as exc:  # the message quotes the value: at most ECHO_CHARS of it
            raise HTTPException(422, str(exc).replace(finding, shorten(finding))) from None
        return self.labels[index]

    def _heatmap(self, gray: np.ndarray, finding: str) -> "CamResult":
        from chestxray.inference.explain import explain

        try:
            with self.lock:
                _, cams = explain(self.analyzer, gray, [finding], name=UPLOAD_NAME)
        except ImageReadError as exc:
            raise UploadError(422, f"cannot read the image: {exc.reason}") from None
        except ChestXrayError as exc:
            raise HTTPException(422, str(exc)) from None
        return cams[0]

    async def heatmap(self, gray: np.ndarray, finding: str, timings: dict[str, float]) -> "CamResult":
        """The Grad-CAM of one finding, within the deadline."""
        loop = asyncio.get_running_loop()
        # Grad-CAM is not batched: one image through the model's hooks on the inference thread.
        return await self.within_deadline(
            self.timed(timings, "inference", loop.run_in_executor(self.inference, self._heatmap, gray, finding))
        )

    async def overlay(self, gray: np.ndarray, finding: str, timings: dict[str, float]) -> tuple[bytes, str | None]:
        """The Grad-CAM overlay PNG and, for a map with no positive value, the note to show instead."""
        cam = await self.heatmap(gray, finding, timings)
        return await self.decoder.run(render.cam_png, gray, cam.heatmap, self.display_max_side), cam.note

    def analysis(self, analysis_id: str) -> Analysis:
        item = self.store.get(analysis_id)
        if item is None:
            raise HTTPException(404, "unknown or expired analysis; upload the image again")
        return item

    def legend(self) -> bytes:
        if self._legend is None:
            self._legend = render.legend_png()
        return self._legend

    async def close(self) -> None:
        await self.batcher.close()


def png(data: bytes, note: str | None = None) -> Response:
    # The note ("no positive evidence for X") travels in a header; the viewer shows it.
    return Response(data, media_type="image/png", headers={CAM_NOTE_HEADER: note} if note else None)


def get_runtime(request: Request) -> ServeRuntime:
    return request.app.state.runtime


Runtime = Annotated[ServeRuntime, Depends(get_runtime)]
