"""Applying a bundle's per-finding calibrator (fitting it is `chestxray.evaluation.calibration`).

Temperature and Platt scaling are both an affine map of each finding's logit,
calibrated = sigmoid(a * logit + b) (temperature: a = 1/T, b = 0), so one representation
serves both, in numpy, in torch and inside an exported ONNX graph. a > 0 always, so the
ranking of images, and with it AUROC, is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chestxray.errors import BundleError
from chestxray.models.bundle import BundleMeta

METHODS = ("none", "temperature", "platt")


@dataclass
class Calibration:
    method: str
    labels: list[str]
    a: np.ndarray  # (C,) slope on the logit, > 0
    b: np.ndarray  # (C,) intercept
    info: dict[str, Any] = field(default_factory=dict)  # provenance and before/after measurements

    def __post_init__(self) -> None:
        self.a = np.asarray(self.a, dtype=np.float64)
        self.b = np.asarray(self.b, dtype=np.float64)
        if self.a.shape != (len(self.labels),) or self.b.shape != (len(self.labels),):
            raise BundleError(f"calibration: one slope and one intercept per label are required ({len(self.labels)})")
        if not (np.all(np.isfinite(self.a)) and np.all(np.isfinite(self.b)) and np.all(self.a > 0)):
            raise BundleError("calibration: slopes must be finite and positive, intercepts finite")

    @classmethod
    def identity(cls, labels: Sequence[str]) -> "Calibration":
        return cls("none", list(labels), np.ones(len(labels)), np.zeros(len(labels)))

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.a == 1.0) and np.all(self.b == 0.0))

    def apply_logits(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits -> calibrated probabilities (float64)."""
        z = np.asarray(logits, dtype=np.float64) * self.a[None, :] + self.b[None, :]
        return 1.0 / (1.0 + np.exp(-z))

    def apply_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) raw sigmoid probabilities -> calibrated ones (via their logits)."""
        p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
        return self.apply_logits(np.log(p) - np.log1p(-p))

    def torch_params(self, device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
        import torch

        return (
            torch.tensor(self.a, dtype=dtype or torch.float32, device=device),
            torch.tensor(self.b, dtype=dtype or torch.float32, device=device),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "form": "p = sigmoid(a * logit + b) per finding",
            "per_finding": {lab: {"a": float(a), "b": float(b)} for lab, a, b in zip(self.labels, self.a, self.b)},
            **self.info,
        }

    @classmethod
    def from_dict(cls, d: Any, labels: Sequence[str], source: str) -> "Calibration":
        if not isinstance(d, dict) or not isinstance(d.get("per_finding"), dict):
            raise BundleError(f"{source}: 'calibration' must hold a 'per_finding' table")
        method = str(d.get("method", ""))
        if method not in METHODS:
            raise BundleError(f"{source}: calibration method {method!r} is not one of {', '.join(METHODS)}")
        table = d["per_finding"]
        if set(table) != set(labels):
            raise BundleError(f"{source}: 'calibration' must give a and b for each of the {len(labels)} labels")
        try:
            a = [float(table[lab]["a"]) for lab in labels]
            b = [float(table[lab]["b"]) for lab in labels]
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{source}: calibration entries must be {{'a': number, 'b': number}}") from None
        info = {k: v for k, v in d.items() if k not in ("method", "form", "per_finding")}
        try:
            return cls(method, list(labels), np.array(a), np.array(b), info)
        except BundleError as exc:
            raise BundleError(f"{source}: {exc}") from None


def calibration_of(meta: BundleMeta) -> Calibration | None:
    """The bundle's calibrator, or None (old bundles, or `--calibrate none`)."""
    if not meta.calibration:
        return None
    cal = Calibration.from_dict(meta.calibration, meta.labels, meta.name)
    return None if cal.is_identity else cal
