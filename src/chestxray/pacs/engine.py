"""The one bridge from the PACS front end to the inference core: load a model once, analyse
decoded DICOM bytes in batches, explain one image with Grad-CAM, and say which model ran.
Everything else in this package calls the core only through `Engine`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chestxray import __version__

if TYPE_CHECKING:
    from chestxray.inference.pipeline import DecodePool
    from chestxray.inference.predict import Analyzer, Prediction


@dataclass(frozen=True)
class ModelInfo:
    """What an SR says about the algorithm that made it."""

    name: str
    variant: str
    version: str  # chestxray's
    sha256: str  # of the model file (bundle or ONNX)
    policy: str | None
    labels: tuple[str, ...] = ()  # the model's findings, in its order (the SR's group order)
    thresholds: tuple[float, ...] = ()


@dataclass
class Cam:
    """One Grad-CAM overlay to burn into a Secondary Capture."""

    finding: str
    probability: float
    threshold: float
    rgb: Any  # H x W x 3 uint8, the overlay without caption


class Engine:
    """An Analyzer loaded once; `analyse` is the batch path (`Analyzer.predict_files`), in
    decoder processes kept for the service's lifetime while `decoders()` is open."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        backend: str = "auto",
        device: str = "cpu",
        batch_size: int = 16,
        cam: bool = False,
    ) -> None:
        from chestxray.inference.explain import check_cam_support
        from chestxray.inference.predict import Analyzer, resolve_backend

        self.backend = resolve_backend(model, backend)
        self.model_arg = model
        if self.backend == "torch":
            from chestxray.models.device import resolve_device

            device = resolve_device(device)
        else:
            device = "cpu"
        self.analyzer: Analyzer = Analyzer.load(model, backend=self.backend, device=device, batch_size=batch_size)
        self._pool: DecodePool | None = None
        if cam:  # torch models, and ONNX files that carry the class activation maps
            check_cam_support(self.analyzer)

    @property
    def labels(self) -> list[str]:
        return list(self.analyzer.labels)

    @cached_property
    def info(self) -> ModelInfo:
        return model_info(self.analyzer, self.model_arg, self.backend)

    @contextmanager
    def decoders(self, workers: int | None = None) -> Iterator[None]:
        """Decoder processes for `analyse` while open (0: none, decode here; None: all cores
        on a machine with more than two, else none). They start once: a listener analyses
        many small batches. On two cores the receiving and sending threads need the other
        core; decoder processes there cost CPU without a faster round trip (BENCHMARKS.md)."""
        if workers is None:
            from chestxray.inference.pipeline import default_workers

            cores = default_workers()
            workers = cores if cores > 2 else 0
        if workers == 0:
            yield
            return
        with self.analyzer.open_pool(workers) as pool:
            self._pool = pool
            try:
                yield
            finally:
                self._pool = None

    def analyse(self, files: Sequence[Path], names: Sequence[str]) -> Iterator["Prediction"]:
        """Findings for DICOM files, lazily and in order (each as soon as its batch has run),
        in batches of the analyzer's batch size; decoded in the `decoders()` processes when
        open, else here."""
        from chestxray.inference.inputs import InputFile

        items = [InputFile(name, data=Path(f)) for f, name in zip(files, names, strict=True)]
        for _, prediction in self.analyzer.predict_files(items, workers=0, pool=self._pool):
            yield prediction

    def explain(self, data: bytes, name: str) -> tuple["Prediction", list[Cam]]:
        """The prediction and an overlay per positive finding (torch, or ONNX with a cam output); the
        findings come from the same forward pass as the maps."""
        from chestxray.inference.explain import explain_image, overlay

        gray, prediction, cams = explain_image(self.analyzer, data, None, name)
        positive = {f.finding: f.threshold for f in prediction.positives}
        out = [
            Cam(c.finding, c.probability, positive[c.finding], overlay(gray, c.heatmap))
            for c in cams
            if c.finding in positive
        ]
        return prediction, out

    @staticmethod
    def failed_input_check(prediction: "Prediction") -> str | None:
        """The input check's warning when it judged the image not a chest X-ray, else None."""
        from chestxray.inference.input_check import OOD_WARNING

        return next((w for w in prediction.warnings if w.startswith(OOD_WARNING)), None)


def model_file(model: str | os.PathLike | None, backend: str) -> Path:
    """The file whose SHA-256 identifies the model: the ONNX file or the safetensors bundle."""
    if backend == "onnx":
        from chestxray.inference.onnx_backend import resolve_onnx_path

        return resolve_onnx_path(model)
    from chestxray.inference.predict import default_bundle_path
    from chestxray.models.bundle import resolve_bundle_path

    return resolve_bundle_path(model) if model is not None else default_bundle_path()


def model_info(analyzer: "Analyzer", model: str | os.PathLike | None, backend: str) -> ModelInfo:
    from chestxray.io import file_sha256

    return ModelInfo(
        analyzer.name,
        analyzer.variant,
        __version__,
        file_sha256(model_file(model, backend)),
        analyzer.threshold_policy,
        tuple(analyzer.labels),
        tuple(float(t) for t in analyzer.thresholds),
    )
