"""Analyzer: a bundle -> findings for files, folders, bytes or arrays.

The CLI, the server and the Python API all go through `Analyzer.predict`, and the
preprocessing comes from the bundle (EvalPreset), never from a second copy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxray.data.images import DecodeLimits, to_gray
from chestxray.data.transforms import EvalPreset, Preprocessing
from chestxray.errors import BundleError, ChestXrayError
from chestxray.inference.backend import Backend
from chestxray.inference.inputs import InputFile
from chestxray.models.bundle import BundleMeta

if TYPE_CHECKING:
    from chestxray.inference.pipeline import DecodePool

log = logging.getLogger(__name__)

Input = str | os.PathLike | bytes | np.ndarray


@dataclass
class Finding:
    finding: str
    probability: float
    threshold: float
    positive: bool

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy is a cost per image in bulk predict's main process.
        return {
            "finding": self.finding,
            "probability": self.probability,
            "threshold": self.threshold,
            "positive": self.positive,
        }


@dataclass
class Prediction:
    """Findings for one image: positives first, then by probability; or an error."""

    file: str
    model: str
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    variant: str = ""  # which build of the model gave the numbers, e.g. "onnx int8" (see Analyzer.variant)
    # Grad-CAM overlays written for this image (predict --cam): finding, path, note.
    overlays: list[dict[str, Any]] | None = None
    # Shown next to the findings, which are still returned (input check, DICOM view/body part).
    warnings: list[str] = field(default_factory=list)
    threshold_policy: str | None = None  # the bundle's operating point, e.g. "sensitivity=0.90"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def positives(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]

    def probability(self, finding: str) -> float:
        for f in self.findings:
            if f.finding == finding:
                return f.probability
        raise KeyError(finding)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "model": self.model,
            "variant": self.variant,
            "findings": [f.to_dict() for f in self.findings],
            "error": self.error,
            "warnings": list(self.warnings),
            "threshold_policy": self.threshold_policy,
        }
        if self.overlays is not None:
            out["overlays"] = self.overlays
        return out


@dataclass
class Embeddings:
    """Feature vectors of many inputs, in input order; an unreadable input has a NaN row
    and its reason in `errors`."""

    files: list[str]
    vectors: np.ndarray  # (N, D) float32
    errors: dict[int, str] = field(default_factory=dict)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: Any, device: str = "cpu", calibration: Any = None, input_check: Any = None) -> None:
        import torch

        self.model = model
        self.device = torch.device(device)
        # Calibration acts on the logits (exact, as in the exported graph); see inference/calibration.
        self.calibrator = calibration  # the Calibration itself, for Grad-CAM's probabilities
        self.calibration = calibration.torch_params(self.device) if calibration is not None else None
        self.input_score = input_check.torch_module().to(self.device) if input_check is not None else None
        self.has_score = self.input_score is not None
        self.check_layers = input_check.layers if input_check is not None else []

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, input-check scores or None) from one forward pass."""
        import contextlib

        import torch

        from chestxray.inference.features import capture_features

        hook: Any = contextlib.nullcontext({})
        if self.input_score is not None:
            hook = capture_features(self.model, self.check_layers)
        with torch.inference_mode(), hook as store:
            # A tensor is used as is: the bulk pipeline hands over batches already on the GPU.
            x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
            x = x.to(self.device)
            logits = self.model(x).float()
            if self.calibration is not None:
                logits = logits * self.calibration[0] + self.calibration[1]
            scores = self.input_score(store).cpu().numpy() if self.input_score is not None else None
            return torch.sigmoid(logits).cpu().numpy(), scores

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, S, S) -> (N, D) pooled feature vectors (the final layer's input)."""
        from chestxray.inference.features import pooled_features

        return pooled_features(self.model, batch)[1]


def default_bundle_path() -> Path:
    """The model shipped inside the package (see MODEL_CARD.md)."""
    from importlib.resources import files

    path = Path(str(files("chestxray.weights").joinpath("default.safetensors")))
    if not path.is_file():
        raise BundleError("this install has no bundled default model; pass model=BUNDLE")
    return path


BACKENDS = ("auto", "torch", "onnx")


def torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # an import hook that refuses torch, or a broken install
        return False


def sniff_model_format(path: str | os.PathLike) -> str | None:
    """ "safetensors", "onnx" or None, from the file's first bytes (never its name alone):
    safetensors starts with an 8-byte header length and a JSON object; ONNX is a protobuf
    ModelProto whose first field is ir_version (tag 0x08)."""
    p = Path(path)
    if p.is_dir():
        return "safetensors" if (p / "model.safetensors").is_file() else ("onnx" if any(p.glob("*.onnx")) else None)
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x08":
        return "onnx"
    return None


def resolve_backend(model: str | os.PathLike | None, backend: str = "auto") -> str:
    """The backend that will run `model`: the one asked for, or for "auto" the file's own
    format; with no model, the bundled PyTorch model, or its ONNX twin when torch is absent."""
    if backend not in BACKENDS:
        raise ChestXrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    fmt = sniff_model_format(model) if model is not None else None
    if backend == "auto":
        if fmt is not None:
            backend = "onnx" if fmt == "onnx" else "torch"
        elif model is not None and str(model).lower().endswith(".onnx"):
            backend = "onnx"
        else:
            backend = "torch"
        if backend == "torch" and not torch_available():
            if model is not None:
                raise ChestXrayError(
                    f"{model}: a PyTorch bundle needs torch, which is not installed; install "
                    "'chestxray[torch]', or export the bundle to ONNX on a machine that has it"
                )
            log.info("torch is not installed: using the ONNX backend (the packaged int8 default.onnx)")
            backend = "onnx"
    elif backend == "torch":
        if fmt == "onnx":
            raise ChestXrayError(f"{model}: this is an ONNX file; use backend='onnx' (or 'auto')")
        if not torch_available():
            raise ChestXrayError(
                "backend='torch' needs torch: pip install 'chestxray[torch]'; "
                "or use backend='onnx' (onnxruntime, no torch needed)"
            )
    return backend


def collect_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively, sorted) and globs into image files; files are kept as
    given. The bulk listing's walker (`inputs.iter_paths`), held in a list."""
    from chestxray.inference.inputs import iter_paths

    return [Path(p) for p in iter_paths(paths)]


# Per-image outcome of the checks that run with every prediction (Analyzer.run).
CHECKS = np.dtype([("score", "f8"), ("turn", "i1"), ("fit", "f4"), ("upright", "f4")])


class Analyzer:
    """Load once, predict many. `Analyzer.load()` with no argument uses the bundled model."""

    # How files are read (e.g. the file size cap); None: `read_image`'s defaults.
    read_limits: DecodeLimits | None = None

    def __init__(
        self,
        backend: Backend,
        labels: Sequence[str],
        thresholds: Sequence[float],
        preprocessing: Preprocessing,
        name: str,
        meta: BundleMeta | None = None,
        batch_size: int = 16,
    ) -> None:
        if len(labels) != len(thresholds):
            raise BundleError("one threshold per label is required")
        self.backend = backend
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.preprocessing = preprocessing
        self.preset = EvalPreset(preprocessing)
        self.name = name
        self.meta = meta
        self.batch_size = max(1, batch_size)
        from chestxray.inference.orientation import orientation_of

        self.orientation = orientation_of(meta)  # None for bundles made before it

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        *,
        backend: str = "auto",
        device: str = "cpu",
        batch_size: int = 16,
        threads: int | None = None,
        background: bool = False,
    ) -> "Analyzer":
        """`model`: a bundle (.safetensors or a run folder), an exported .onnx file, or None
        for the bundled model. `backend`: "auto" (from the file; without torch, ONNX),
        "torch" or "onnx". `threads`: onnxruntime intra-op threads (None: its default).
        `background` (ONNX): return at once with the metadata read; the session is built when
        first needed, or in a thread once the bulk pipeline starts (its workers start
        meanwhile), and not at all when the pipeline's workers infer; an error in the file
        then shows when the pipeline starts."""
        backend = resolve_backend(model, backend)
        if backend == "onnx":
            from chestxray.inference.onnx_backend import OnnxBackend, loading_onnx_backend

            # None: the packaged default.onnx, or an error telling how to export one.
            onnx: Any = loading_onnx_backend(model, threads) if background else None
            if onnx is None:
                onnx = OnnxBackend(model, threads=threads)
            meta = onnx.info.meta
            return cls(onnx, meta.labels, meta.thresholds, meta.preprocessing, meta.name, meta, batch_size)
        from chestxray.inference.calibration import calibration_of
        from chestxray.inference.input_check import load_input_check
        from chestxray.models.bundle import load_bundle, resolve_bundle_path

        path = resolve_bundle_path(model) if model is not None else default_bundle_path()
        net, meta = load_bundle(path, device=device)
        torch_backend = TorchBackend(net, device, calibration_of(meta), load_input_check(meta, path))
        return cls(torch_backend, meta.labels, meta.thresholds, meta.preprocessing, meta.name, meta, batch_size)

    @property
    def variant(self) -> str:
        """Which build of the model runs: "pytorch float32", "onnx float32" or "onnx int8".
        The packaged default.onnx is int8: its probabilities differ from the PyTorch
        model's by up to about 0.03, so outputs name the variant beside the model name."""
        if self.backend.name != "onnx":
            return f"{self.backend.name if self.backend.name != 'torch' else 'pytorch'} float32"
        return "onnx int8" if self.backend.quantization.startswith("int8") else "onnx float32"

    def result(
        self,
        name: str,
        findings: list[Finding] | None = None,
        error: str | None = None,
        warnings: list[str] | None = None,
    ) -> Prediction:
        """A Prediction of this model (name, variant and threshold policy filled in)."""
        return Prediction(
            name,
            self.name,
            findings or [],
            error,
            variant=self.variant,
            warnings=list(warnings or []),
            threshold_policy=self.threshold_policy,
        )

    @property
    def model(self) -> Any:
        """The torch module (torch backend only), e.g. for Grad-CAM."""
        if self.backend.model is None:
            raise ChestXrayError(
                f"the {self.backend.name} backend has no torch model (on ONNX, Grad-CAM comes from the file's "
                "cam output: inference.explain)"
            )
        return self.backend.model

    def preprocess(self, image: Input, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(gray uint8 original, model input (1, S, S) float32) for one input."""
        gray = to_gray(image, name, self.read_limits)
        return gray, self.preset(gray)

    @staticmethod
    def to_gray(image: Input, name: str | None = None) -> np.ndarray:
        return to_gray(image, name)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.backend.probabilities(batch)

    @property
    def has_checks(self) -> bool:
        return self.backend.loaded().has_score or self.orientation is not None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated probabilities, per-image checks or None) from one pass. The checks are
        a record per image (CHECKS): the input check's score (NaN without one) and the
        orientation check's outcome (code 0 without one); `warnings_for` reads them."""
        probs, scores = self.backend.run(batch)
        if scores is None and self.orientation is None:
            return probs, None
        checks = np.zeros(len(probs), CHECKS)
        checks["score"] = np.nan if scores is None else scores
        if self.orientation is not None:
            checks["turn"], checks["fit"], checks["upright"] = self.orientation.assess(batch)
        return probs, checks

    @property
    def threshold_policy(self) -> str | None:
        op = (self.meta.operating_point if self.meta is not None else None) or {}
        return op.get("policy")

    def warnings_for(self, item: Input, label: str, checks: Any) -> list[str]:
        """Warnings shown next to an image's findings: the input check, else the orientation
        check (a turned cat is not news), then DICOM header checks. `checks`: this image's
        record from `run` (or a bare input-check score, or None)."""
        from chestxray.inference.input_check import dicom_warnings, warning_text
        from chestxray.inference.orientation import orientation_warning

        out = []
        record = checks is not None and getattr(checks, "dtype", None) == CHECKS
        score = float(checks["score"]) if record else (None if checks is None else float(checks))
        check = self.meta.input_check if self.meta is not None else None
        if score is not None and not np.isnan(score) and check:
            text = warning_text(score, float(check["cutoff"]))
            out += [text] if text else []
        if record and not out:
            text = orientation_warning(int(checks["turn"]), float(checks["fit"]), float(checks["upright"]))
            out += [text] if text else []
        return out + dicom_warnings(item, label)

    def findings_from(self, probs: np.ndarray) -> list[Finding]:
        items = [
            Finding(lab, float(p), float(t), bool(p >= t)) for lab, p, t in zip(self.labels, probs, self.thresholds)
        ]
        return sorted(items, key=lambda f: (not f.positive, -f.probability))

    def predict(
        self, inputs: Input | Sequence[Input], *, names: Sequence[str] | None = None, progress: bool = False
    ) -> Prediction | list[Prediction]:
        """Findings for one input (returns a Prediction) or many (a list, same order).

        Inputs are paths, raw bytes or gray arrays. An unreadable input gives a
        Prediction with `error` set; the others still finish.
        """
        if isinstance(inputs, (str, os.PathLike, bytes, np.ndarray)):
            return self.predict_many([inputs], names=names, progress=progress)[0]
        return self.predict_many(inputs, names=names, progress=progress)

    def predict_many(
        self,
        inputs: Iterable[Input],
        *,
        names: Iterable[str] | None = None,
        progress: bool = False,
        workers: int | None = 0,
        batch_size: int | None = None,
    ) -> list[Prediction]:
        """As `predict` for an iterable (read as it goes), typed as a list. With `workers`
        (None: all cores, or N), the bulk pipeline's worker processes decode (and may infer)
        file paths; 0 (the default): this process. `names`: what each result calls its input
        (default: the path, or "<input K>")."""
        from tqdm.auto import tqdm

        if workers != 0 or names is not None:
            inputs = list(inputs)
            if not all(isinstance(x, (str, os.PathLike)) for x in inputs):
                workers = 0  # in-memory images are decoded here, not sent to worker processes
        total = len(inputs) if isinstance(inputs, list) else None
        results = self.predict_files(self._items(inputs, names), workers=workers, batch_size=batch_size)
        out = [p for _, p in tqdm(results, total=total, unit="img", desc="predict", disable=not progress)]
        for p in out:
            if p.error is not None:
                log.warning("skipped %s: %s", p.file, p.error)
        return out

    def predict_files(
        self,
        files: Iterable[InputFile],
        *,
        workers: int | None = None,
        batch_size: int | None = None,
        pool: DecodePool | None = None,
    ) -> Iterator[tuple[InputFile, Prediction]]:
        """(file, Prediction), lazily and in input order, through the streaming pipeline
        (inference/pipeline.py): `workers` processes decode (None: all cores; 0: this process),
        or the processes of `pool` (`open_pool`). For archives of any size: memory stays bounded."""
        from chestxray.inference.pipeline import iter_outputs

        outputs = iter_outputs(self, files, workers=workers, batch_size=batch_size, pool=pool)
        for f, probs, checks, error in outputs:
            if probs is None:
                yield f, self.result(f.path, error=error)
            else:
                warnings = self.warnings_for(f.source, f.path, checks)
                yield f, self.result(f.path, self.findings_from(probs), warnings=warnings)

    def open_pool(self, workers: int | None = None) -> DecodePool:
        """Decoder processes kept for many `predict_files(pool=...)` calls (a service: they
        start once, not per batch); a context manager. `workers`: None for all cores."""
        from chestxray.inference.pipeline import open_pool

        return open_pool(self, workers)

    def embed(
        self, inputs: Iterable[Input], *, names: Iterable[str] | None = None, progress: bool = False
    ) -> Embeddings:
        """Pooled feature vectors (the input of the final layer) for retrieval, clustering or
        linear probes. Torch backend, or an ONNX file exported with a "features" output."""
        from tqdm.auto import tqdm

        from chestxray.inference.pipeline import iter_outputs

        files = list(self._items(inputs, names))
        outputs = iter_outputs(self, files, workers=0, features=True)
        rows = [(v, e) for _, v, _, e in tqdm(outputs, total=len(files), desc="embed", disable=not progress)]
        vectors = np.full((len(files), next((len(v) for v, _ in rows if v is not None), 0)), np.nan, np.float32)
        for i, (v, _) in enumerate(rows):
            if v is not None:
                vectors[i] = v
        return Embeddings([f.path for f in files], vectors, {i: e for i, (_, e) in enumerate(rows) if e is not None})

    @staticmethod
    def _items(inputs: Iterable[Input], names: Iterable[str] | None) -> Iterable[InputFile]:
        """The pipeline's items: a path as itself, else named "<input K>" (bytes, arrays), or
        each input under its given name."""
        if names is None:
            return (
                InputFile(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else InputFile(f"<input {i}>", data=x)
                for i, x in enumerate(inputs)
            )
        items, labels = list(inputs), list(names)
        if len(items) != len(labels):
            raise ChestXrayError(f"predict: {len(items)} inputs but {len(labels)} names")
        return [InputFile(name, data=x) for x, name in zip(items, labels)]
