"""Input check: is this image like the frontal chest X-rays the model was trained on?

Score: the Mahalanobis distance of an image's pooled features (the head input) from the
training split's, under a Ledoit-Wolf shrinkage covariance (scikit-learn). The training
features have rank < n, so the shrunk covariance has k <= n - 1 eigenvalues above a floor
(shrinkage x mean variance) and all others equal to it; the distance is therefore exact
from the top-k eigenvectors, their eigenvalues and the floor:

    d^2 = sum_i (u_i . x)^2 / l_i + (|x|^2 - sum_i (u_i . x)^2) / floor,   x = f - mean

The tensors (mean, basis U, 1/sqrt(l)) live in the bundle's safetensors file under
"input_check.*"; the cut-off and provenance in its JSON. DICOM headers add two cheap
checks (a lateral ViewPosition, a BodyPartExamined other than chest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.errors import BundleError

TENSOR_PREFIX = "input_check."
OOD_WARNING = "unlike the frontal chest X-rays this model was trained on"
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE", "LO"}
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO")


@dataclass
class InputCheck:
    mean: np.ndarray  # (D,) float32
    basis: np.ndarray  # (D, k) orthonormal columns (stored as float16)
    scale: np.ndarray  # (k,) 1 / sqrt(eigenvalue)
    floor: float  # the shrunk covariance's eigenvalue outside the basis
    cutoff: float  # scores above it are warned
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) pooled features -> (N,) Mahalanobis distances (float64)."""
        x = np.asarray(features, dtype=np.float64) - self.mean.astype(np.float64)
        proj = x @ self.basis.astype(np.float64)
        inside = np.sum((proj * self.scale.astype(np.float64)) ** 2, axis=1)
        rest = np.maximum(np.sum(x * x, axis=1) - np.sum(proj * proj, axis=1), 0.0)
        return np.sqrt(inside + rest / self.floor)

    def torch_module(self) -> Any:
        """The same score as a torch module (features -> distances), for the torch backend
        and for the ONNX graph (the same arithmetic in float32)."""
        import torch

        check = self

        class MahalanobisScore(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("mean", torch.from_numpy(check.mean.astype(np.float32)))
                self.register_buffer("basis", torch.from_numpy(check.basis.astype(np.float32)))
                self.register_buffer("scale", torch.from_numpy(check.scale.astype(np.float32)))
                self.inv_floor = float(1.0 / check.floor)

            def forward(self, features: torch.Tensor) -> torch.Tensor:
                x = features.float() - self.mean
                proj = x @ self.basis
                inside = ((proj * self.scale) ** 2).sum(1)
                rest = torch.clamp((x * x).sum(1) - (proj * proj).sum(1), min=0.0)
                return torch.sqrt(inside + rest * self.inv_floor)

        return MahalanobisScore()

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            TENSOR_PREFIX + "mean": self.mean.astype(np.float32),
            TENSOR_PREFIX + "basis": self.basis.astype(np.float16),
            TENSOR_PREFIX + "scale": self.scale.astype(np.float32),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "Mahalanobis distance of the pooled features (head input), Ledoit-Wolf shrinkage covariance",
            "cutoff": float(self.cutoff),
            "floor": float(self.floor),
            "components": int(self.basis.shape[1]),
            "features": int(self.mean.shape[0]),
            "tensors": sorted(self.tensors()),
            **self.info,
        }

    def warning(self, score: float) -> str | None:
        if not np.isfinite(score) or score > self.cutoff:
            return f"{OOD_WARNING} (input score {score:.1f} > cut-off {self.cutoff:.1f})"
        return None


def fit_input_check(
    train_features: np.ndarray, val_features: np.ndarray, *, margin: float = 1.1, info: dict[str, Any] | None = None
) -> InputCheck:
    """Fit on the training split's features; cut-off = `margin` x the largest validation
    score, so that (by construction) no validation radiograph is warned and held-out
    radiographs rarely are (BENCHMARKS.md measures it). A percentile would warn that share
    of real radiographs by definition."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(train_features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 3:
        raise ValueError(f"input check: need (N >= 3, D) training features, got {f.shape}")
    lw = LedoitWolf(assume_centered=False).fit(f)
    evals, evecs = np.linalg.eigh(lw.covariance_)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    floor = float(max(evals.min(), 1e-12))
    keep = evals > floor * (1 + 1e-6)
    basis = evecs[:, keep].astype(np.float16)  # stored at half size; scores use the stored values
    check = InputCheck(
        lw.location_.astype(np.float32), basis, (1.0 / np.sqrt(evals[keep])).astype(np.float32), floor, np.inf
    )
    val_scores = check.score(val_features)
    train_scores = check.score(f)
    check.cutoff = float(margin * val_scores.max())
    check.info = {
        "shrinkage": float(lw.shrinkage_),
        "cutoff_rule": f"{margin} x the largest validation score",
        "train_images": int(len(f)),
        "val_images": int(len(val_scores)),
        "train_score_percentiles": _percentiles(train_scores),
        "val_score_percentiles": _percentiles(val_scores),
        **(info or {}),
    }
    return check


def _percentiles(scores: np.ndarray) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(scores, q)) for q in (50, 90, 99, 100)}


def load_input_check(meta: Any, path: str | os.PathLike | None) -> InputCheck | None:
    """The bundle's input check (tensors from its safetensors file), or None if it has none."""
    d = getattr(meta, "input_check", None)
    if not d or path is None:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            t = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(TENSOR_PREFIX)}
        mean, basis, scale = (t[TENSOR_PREFIX + k] for k in ("mean", "basis", "scale"))
        return InputCheck(mean, basis, scale, float(d["floor"]), float(d["cutoff"]), dict(d))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: the bundle's input check is incomplete ({exc})") from None


def dicom_warnings(source: Any, name: str | None = None) -> list[str]:
    """Warnings from a DICOM header (lateral view, not a chest); [] for other inputs.
    Only these two tags are read and quoted; nothing that identifies a patient."""
    if isinstance(source, np.ndarray):
        return []
    from chestxray.data.images import is_dicom_bytes

    try:
        if isinstance(source, bytes):
            data, label = source, name or ""
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
        import io

        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        view = str(getattr(ds, "ViewPosition", "") or "").strip().upper()
        part = str(getattr(ds, "BodyPartExamined", "") or "").strip().upper()
    except Exception:  # the image reader reports unreadable files; the check adds nothing then
        return []
    out = []
    if view in LATERAL_VIEWS:
        out.append(f"DICOM ViewPosition is {view[:16]} (lateral): this model was trained on frontal (PA/AP) views")
    if part and not any(c in part for c in CHEST_PARTS):
        out.append(f"DICOM BodyPartExamined is {part[:16]}, not chest: this model reads chest X-rays only")
    return out
