"""Input check: is this image like the frontal chest X-rays the model was trained on?

Score: the Mahalanobis distance of an image's pooled features from the training split's,
under a Ledoit-Wolf shrinkage covariance (scikit-learn), for the head input and, where the
architecture has one, an early stage (ResNet layer1: texture and contrast, where photographs,
text and noise differ most; the head features alone warned only half of them, BENCHMARKS.md).
Each distance is divided by its own cut-off and the larger one is the score (warned above 1).
The training features have rank < n, so the shrunk covariance has k <= n - 1 eigenvalues
above a floor (shrinkage x mean variance) and all others equal to it; the distance is
therefore exact from the top-k eigenvectors, their eigenvalues and the floor:

    d^2 = sum_i (u_i . x)^2 / l_i + (|x|^2 - sum_i (u_i . x)^2) / floor,   x = f - mean

The tensors (mean, basis U, 1/sqrt(l)) live in the bundle's safetensors file under
"input_check.<layer>.*"; the cut-off and provenance in its JSON. DICOM headers add two cheap
checks (a lateral ViewPosition, a BodyPartExamined other than chest).
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.errors import BundleError
from chestxray.models.bundle import BundleMeta

TENSOR_PREFIX = "input_check."
OOD_WARNING = "unlike the frontal chest X-rays this model was trained on"
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE", "LO"}
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO")
#: BodyPartExamined values quoted in a warning: common DICOM defined terms (PS3.16 CID 4031).
# fmt: off
BODY_PARTS = frozenset({
    "ABDOMEN", "ANKLE", "ARM", "BREAST", "CALF", "CLAVICLE", "COCCYX", "CSPINE", "ELBOW", "EXTREMITY",
    "FACE", "FINGER", "FOOT", "FOREARM", "HAND", "HEAD", "HEART", "HIP", "HUMERUS", "JAW", "KNEE", "LEG",
    "LSPINE", "NECK", "PELVIS", "SACRUM", "SCAPULA", "SHOULDER", "SKULL", "SPINE", "SSPINE", "THIGH", "TOE",
    "TSPINE", "WRIST", "ABDOMENPELVIS", "HEADNECK", "KIDNEY", "LIVER", "ORBIT", "SINUS", "TMJ", "ZYGOMA",
})
# fmt: on
#: pydicom reads a data element's tag, VR and length at once, then a non-empty value.
READS_PER_ELEMENT = 2


@dataclass
class MahalanobisPart:
    """One feature set's distance: mean, top-k basis, 1/sqrt(eigenvalues), floor, cut-off."""

    layer: str  # "head" (the head input) or a module name, e.g. "backbone.layer1"
    mean: np.ndarray  # (D,) float32
    basis: np.ndarray  # (D, k) orthonormal columns (stored as float16)
    scale: np.ndarray  # (k,) 1 / sqrt(eigenvalue)
    floor: float  # the shrunk covariance's eigenvalue outside the basis
    cutoff: float = np.inf  # this part's distance at which the relative score reaches 1

    def distance(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64) - self.mean.astype(np.float64)
        proj = x @ self.basis.astype(np.float64)
        inside = np.sum((proj * self.scale.astype(np.float64)) ** 2, axis=1)
        rest = np.maximum(np.sum(x * x, axis=1) - np.sum(proj * proj, axis=1), 0.0)
        return np.sqrt(inside + rest / self.floor)

    def key(self, what: str) -> str:
        return f"{TENSOR_PREFIX}{self.layer}.{what}"


@dataclass
class InputCheck:
    """score = max over parts of (distance / that part's cut-off); warned above 1."""

    parts: list[MahalanobisPart]
    info: dict[str, Any] = field(default_factory=dict)
    cutoff: float = 1.0

    @property
    def layers(self) -> list[str]:
        return [p.layer for p in self.parts]

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """{layer: (N, D) pooled features} -> (N,) relative scores (float64)."""
        return np.max([p.distance(features[p.layer]) / p.cutoff for p in self.parts], axis=0)

    def torch_module(self) -> Any:
        """The same score as a torch module ({layer: features} -> scores), for the torch
        backend and for the ONNX graph (the same arithmetic in float32)."""
        import torch

        parts = self.parts

        class MahalanobisScore(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = [p.layer for p in parts]
                for i, p in enumerate(parts):
                    self.register_buffer(f"mean{i}", torch.from_numpy(p.mean.astype(np.float32)))
                    self.register_buffer(f"basis{i}", torch.from_numpy(p.basis.astype(np.float32)))
                    self.register_buffer(f"scale{i}", torch.from_numpy(p.scale.astype(np.float32)))
                self.inv_floor = [float(1.0 / p.floor) for p in parts]
                self.inv_cut = [float(1.0 / p.cutoff) for p in parts]

            def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
                out = []
                for i, layer in enumerate(self.layers):
                    x = features[layer].float() - getattr(self, f"mean{i}")
                    proj = x @ getattr(self, f"basis{i}")
                    inside = ((proj * getattr(self, f"scale{i}")) ** 2).sum(1)
                    rest = torch.clamp((x * x).sum(1) - (proj * proj).sum(1), min=0.0)
                    out.append(torch.sqrt(inside + rest * self.inv_floor[i]) * self.inv_cut[i])
                return torch.stack(out, 1).amax(1)

        return MahalanobisScore()

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for p in self.parts:
            out[p.key("mean")] = p.mean.astype(np.float32)
            out[p.key("basis")] = p.basis.astype(np.float16)
            out[p.key("scale")] = p.scale.astype(np.float32)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "Mahalanobis distance of pooled features under a Ledoit-Wolf shrinkage covariance, per "
            "feature set; score = max over sets of distance / that set's cut-off; warned when score > cutoff",
            "cutoff": float(self.cutoff),
            "parts": [
                {
                    "layer": p.layer,
                    "features": int(p.mean.shape[0]),
                    "components": int(p.basis.shape[1]),
                    "floor": float(p.floor),
                    "distance_cutoff": float(p.cutoff),
                }
                for p in self.parts
            ],
            **self.info,
        }

    def warning(self, score: float) -> str | None:
        return warning_text(score, self.cutoff)


def warning_text(score: float, cutoff: float) -> str | None:
    if not np.isfinite(score) or score > cutoff:
        return f"{OOD_WARNING} (input score {score:.2f} > cut-off {cutoff:.2f})"
    return None


def fit_part(layer: str, train: np.ndarray, val: np.ndarray, margin: float) -> tuple[MahalanobisPart, dict]:
    from sklearn.covariance import LedoitWolf

    f = np.asarray(train, dtype=np.float64)
    if f.ndim != 2 or len(f) < 3:
        raise ValueError(f"input check: need (N >= 3, D) training features for {layer}, got {f.shape}")
    lw = LedoitWolf(assume_centered=False).fit(f)
    evals, evecs = np.linalg.eigh(lw.covariance_)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    floor = float(max(evals.min(), 1e-12))
    keep = evals > floor * (1 + 1e-6)
    part = MahalanobisPart(
        layer,
        lw.location_.astype(np.float32),
        evecs[:, keep].astype(np.float16),  # stored at half size; distances use the stored values
        (1.0 / np.sqrt(evals[keep])).astype(np.float32),
        floor,
    )
    val_d = part.distance(val)
    part.cutoff = float(margin * val_d.max())
    stats = {
        "layer": layer,
        "shrinkage": float(lw.shrinkage_),
        "train_distance_percentiles": _percentiles(part.distance(f)),
        "val_distance_percentiles": _percentiles(val_d),
    }
    return part, stats


def fit_input_check(
    train_features: dict[str, np.ndarray],
    val_features: dict[str, np.ndarray],
    *,
    margin: float = 1.1,
    info: dict[str, Any] | None = None,
) -> InputCheck:
    """Fit each feature set on the training split; its cut-off = `margin` x the largest
    validation distance, so that no validation radiograph is warned and held-out ones
    rarely are (BENCHMARKS.md measures it). A percentile would warn that share of real
    radiographs by definition."""
    parts, stats = [], []
    for layer in train_features:
        part, st = fit_part(layer, train_features[layer], val_features[layer], margin)
        parts.append(part)
        stats.append(st)
    return InputCheck(
        parts,
        {
            "cutoff_rule": f"per feature set, {margin} x the largest validation distance",
            "train_images": int(len(next(iter(train_features.values())))),
            "val_images": int(len(next(iter(val_features.values())))),
            "fit": stats,
            **(info or {}),
        },
    )


def _percentiles(scores: np.ndarray) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(scores, q)) for q in (50, 90, 99, 100)}


def load_input_check(meta: BundleMeta, path: str | os.PathLike | None) -> InputCheck | None:
    """The bundle's input check (tensors from its safetensors file), or None if it has none."""
    d = meta.input_check
    if not d or path is None:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            names = list(fh.keys())  # safe_open is not a dict: no `in` on it
            t = {k: fh.get_tensor(k) for k in names if k.startswith(TENSOR_PREFIX)}
        parts = []
        for entry in d["parts"]:
            layer = str(entry["layer"])
            mean, basis, scale = (t[f"{TENSOR_PREFIX}{layer}.{k}"] for k in ("mean", "basis", "scale"))
            parts.append(
                MahalanobisPart(layer, mean, basis, scale, float(entry["floor"]), float(entry["distance_cutoff"]))
            )
        info = {k: v for k, v in d.items() if k not in ("parts", "cutoff", "method")}
        return InputCheck(parts, info, float(d["cutoff"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: the bundle's input check is incomplete ({exc})") from None


class _TooManyElements(Exception):
    pass


class _BoundedReader(io.BytesIO):
    """A file whose reads are counted: pydicom reads each data element's tag, length and
    value separately, so a cap on reads caps the elements parsed, nested sequences
    included (pydicom has no element limit of its own)."""

    def __init__(self, data: bytes, max_reads: int) -> None:
        super().__init__(data)
        self.reads_left = max_reads

    def read(self, size: int | None = -1) -> bytes:
        self.reads_left -= 1
        if self.reads_left % 512 == 0:
            if self.reads_left < 0:
                raise _TooManyElements
            time.sleep(0)  # let other threads (a server's event loop) take the GIL between elements
        return super().read(size)


def dicom_warnings(source: Any, name: str | None = None, max_elements: int | None = None) -> list[str]:
    """Warnings from a DICOM header (lateral view, not a chest); [] for other inputs.
    Only these two tags are read, and a value is quoted only when it is one of the DICOM
    defined terms (a file may hold anything there, a patient name included).

    With `max_elements`, a header of more data elements than that (about: reads are
    counted) raises DecodeLimitError after a bounded amount of work.
    """
    if isinstance(source, np.ndarray):
        return []
    from chestxray.data.images import _quiet_pydicom_log, is_dicom_bytes
    from chestxray.errors import DecodeLimitError

    label = name or ""
    try:
        if isinstance(source, bytes):
            data = source
        else:
            p = Path(source)
            with open(p, "rb") as fh:
                data = fh.read(132)
            label = str(p)
            if not (is_dicom_bytes(data) or p.suffix.lower() in (".dcm", ".dicom")):
                return []
            data = p.read_bytes()
        if not (is_dicom_bytes(data[:132]) or label.lower().endswith((".dcm", ".dicom"))):
            return []
        import pydicom

        fp = _BoundedReader(data, READS_PER_ELEMENT * max_elements if max_elements else 2**62)
        # pydicom logs and warns about odd values (an unknown SpecificCharacterSet) by quoting them.
        with warnings.catch_warnings(), _quiet_pydicom_log():
            warnings.simplefilter("ignore")
            # Values over 1 KiB (pixel data) are skipped, not read; the two tags are short strings.
            ds = pydicom.dcmread(fp, defer_size=1024, force=True)
            view = _tag_text(ds, "ViewPosition")
            part = _tag_text(ds, "BodyPartExamined")
    except _TooManyElements:
        raise DecodeLimitError(label, f"the DICOM header has more than {max_elements} data elements") from None
    except Exception:  # the image reader reports unreadable files; the check adds nothing then
        return []
    out = []
    if view in LATERAL_VIEWS:
        out.append(f"DICOM ViewPosition is {view} (lateral): this model was trained on frontal (PA/AP) views")
    if part and not any(c in part for c in CHEST_PARTS):
        shown = part if part in BODY_PARTS else "an unexpected value"
        out.append(f"DICOM BodyPartExamined is {shown}, not chest: this model reads chest X-rays only")
    return out


def _tag_text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()[:64]
