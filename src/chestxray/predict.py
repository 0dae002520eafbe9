"""Analyzer: a bundle -> findings for files, folders, bytes or arrays.

The CLI, the server and the Python API all go through `Analyzer.predict`, and the
preprocessing comes from the bundle (EvalPreset), never from a second copy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np

from chestxray.data.images import IMAGE_SUFFIXES, read_image
from chestxray.data.transforms import EvalPreset, Preprocessing
from chestxray.errors import BundleError, ChestXrayError, ImageReadError

log = logging.getLogger(__name__)

Input = Union[str, os.PathLike, bytes, np.ndarray]


@dataclass
class Finding:
    finding: str
    probability: float
    threshold: float
    positive: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prediction:
    """Findings for one image: positives first, then by probability; or an error."""

    file: str
    model: str
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None

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
        return {
            "file": self.file,
            "model": self.model,
            "findings": [f.to_dict() for f in self.findings],
            "error": self.error,
        }


class Backend(Protocol):
    """Runs the network: (N, 1, S, S) float32 in [0, 1] -> (N, C) probabilities."""

    name: str

    def probabilities(self, batch: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    name = "torch"

    def __init__(self, model: Any, device: str = "cpu") -> None:
        import torch

        self.model = model
        self.device = torch.device(device)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return torch.sigmoid(self.model(x).float()).cpu().numpy()


def default_bundle_path() -> Path:
    """The model shipped inside the package (see MODEL_CARD.md)."""
    from importlib.resources import files

    path = Path(str(files("chestxray.weights").joinpath("default.safetensors")))
    if not path.is_file():
        raise BundleError("this install has no bundled default model; pass --model BUNDLE")
    return path


def collect_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files; files are kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


class Analyzer:
    """Load once, predict many. `Analyzer.load()` with no argument uses the bundled model."""

    def __init__(self, backend: Backend, labels: Sequence[str], thresholds: Sequence[float],
                 preprocessing: Preprocessing, name: str, meta: Any = None, batch_size: int = 16) -> None:
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

    @classmethod
    def load(cls, bundle: str | os.PathLike | None = None, *, backend: str = "torch",
             device: str = "cpu", batch_size: int = 16) -> "Analyzer":
        if backend == "onnx":
            from chestxray.onnx_backend import load_onnx_analyzer

            # None: the packaged default.onnx, or an error telling how to export one.
            return load_onnx_analyzer(cls, bundle, batch_size=batch_size)
        path = Path(bundle) if bundle is not None else default_bundle_path()
        if backend == "torch":
            from chestxray.bundle import load_bundle

            model, meta = load_bundle(path, device=device)
            return cls(TorchBackend(model, device), meta.labels, meta.thresholds, meta.preprocessing,
                       meta.name, meta, batch_size)
        raise ChestXrayError(f"unknown backend {backend!r}; choose torch or onnx")

    @property
    def model(self) -> Any:
        """The torch module (torch backend only), e.g. for Grad-CAM."""
        model = getattr(self.backend, "model", None)
        if model is None:
            raise ChestXrayError(f"the {self.backend.name} backend has no torch model; Grad-CAM needs the torch backend")
        return model

    def preprocess(self, image: Input, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(gray uint8 original, model input (1, S, S) float32) for one input."""
        gray = self.to_gray(image, name)
        return gray, self.preset(gray)

    @staticmethod
    def to_gray(image: Input, name: str | None = None) -> np.ndarray:
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 3 and arr.shape[-1] in (3, 4):
                arr = arr[..., :3].mean(axis=-1)
            if arr.ndim != 2:
                raise ImageReadError(name or "<array>", f"expected a 2-D gray image, got shape {image.shape}")
            if arr.dtype != np.uint8:
                if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                    arr = arr * 255.0
                arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
            return arr
        return read_image(image, name)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.backend.probabilities(batch)

    def findings_from(self, probs: np.ndarray) -> list[Finding]:
        items = [
            Finding(lab, float(p), float(t), bool(p >= t))
            for lab, p, t in zip(self.labels, probs, self.thresholds)
        ]
        return sorted(items, key=lambda f: (not f.positive, -f.probability))

    def predict(self, inputs: Input | Sequence[Input], *, names: Sequence[str] | None = None,
                progress: bool = False) -> Prediction | list[Prediction]:
        """Findings for one input (returns a Prediction) or many (a list, same order).

        Inputs are paths, raw bytes or gray arrays. An unreadable input gives a
        Prediction with `error` set; the others still finish.
        """
        single = isinstance(inputs, (str, os.PathLike, bytes, np.ndarray))
        items: list[Input] = [inputs] if single else list(inputs)  # type: ignore[list-item]
        labels = list(names) if names is not None else [self._label(x, i) for i, x in enumerate(items)]
        results = list(self.iter_predict(items, labels, progress=progress))
        return results[0] if single else results

    def iter_predict(self, items: Sequence[Input], labels: Sequence[str], progress: bool = False) -> Iterator[Prediction]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), unit="img", desc="predict", disable=not progress)
        for start in range(0, len(items), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(items)))
            ready: list[tuple[int, np.ndarray]] = []
            errors: dict[int, str] = {}
            for i in chunk:
                try:
                    ready.append((i, self.preprocess(items[i], labels[i])[1]))
                except ImageReadError as exc:
                    errors[i] = exc.reason
                    log.warning("skipped %s: %s", labels[i], exc.reason)
                except Exception as exc:  # one odd input must not lose the others' results
                    # Only the type: library messages can quote file contents.
                    errors[i] = f"cannot read this input ({type(exc).__name__})"
                    log.warning("skipped %s: %s", labels[i], errors[i])
            probs = self.probabilities(np.stack([x for _, x in ready])) if ready else np.zeros((0, len(self.labels)))
            by_index = {i: p for (i, _), p in zip(ready, probs)}
            for i in chunk:
                if i in errors:
                    yield Prediction(labels[i], self.name, [], errors[i])
                else:
                    yield Prediction(labels[i], self.name, self.findings_from(by_index[i]))
            bar.update(len(chunk))
        bar.close()

    @staticmethod
    def _label(item: Input, i: int) -> str:
        if isinstance(item, (str, os.PathLike)):
            return str(item)
        return f"<input {i}>"
