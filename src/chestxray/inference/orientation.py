"""Orientation check: does a radiograph look turned (90, 180, 270 degrees) or inverted?

The Mahalanobis input check (input_check.py) misses radiographs turned on their side: their
texture and pooled features stay radiograph-like. Their layout does not: this check keeps a
small template, the mean of the training images' standardised 32 x 32 thumbnails (dark lungs
left and right of a bright mediastinum, shoulders above, diaphragm below), and compares an
input's thumbnail (Pearson correlation) with the template as it is, turned by each quarter
turn, and negated (a photographic negative). When one of those seven alternatives fits
better than the upright template by more than `margin`, the image is warned with the
alternative that fitted best. Hand-written because no library offers an orientation test for
radiographs; it is a few numpy lines (a 1,024-value template in the bundle's JSON, one small
matrix product per batch), so it runs the same with the torch and the ONNX backends.
BENCHMARKS.md measures it (rotated, upside-down and inverted radiographs; real ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chestxray.errors import BundleError
from chestxray.models.bundle import BundleMeta

THUMB = 32
DEFAULT_MARGIN = 0.25  # chosen on the bundled model's validation split: MODEL_CARD.md "Input check"
# Alternatives in the order of the codes below: code = quarter turns + 4 * negated.
_TURNS = ("upright", "turned 90 degrees counter-clockwise", "upside down", "turned 90 degrees clockwise")


def thumbnails(batch: Any, size: int = THUMB) -> np.ndarray:
    """(N, 1, S, S) model inputs (numpy, or a torch tensor on any device) -> (N, size * size)
    thumbnails, each standardised to mean 0 and standard deviation 1 (so any brightness and
    contrast, and any per-bundle input scaling, give the same thumbnail)."""
    if not isinstance(batch, np.ndarray):  # a torch tensor (the bulk pipeline's GPU batches): pool where it is
        import torch

        with torch.no_grad():
            batch = torch.nn.functional.adaptive_avg_pool2d(batch.float(), size).cpu().numpy()
    x = np.asarray(batch, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"orientation: expected (N, C, S, S) model inputs, got {x.shape}")
    x = x.mean(axis=1)
    if x.shape[-2:] != (size, size):
        rows = np.linspace(0, x.shape[-2], size + 1).astype(int)
        cols = np.linspace(0, x.shape[-1], size + 1).astype(int)
        x = np.add.reduceat(np.add.reduceat(x, cols[:-1], axis=-1), rows[:-1], axis=-2)
        x = x / np.outer(np.diff(rows), np.diff(cols))[None]
    return _standardise(x.reshape(len(x), -1))


def _standardise(t: np.ndarray) -> np.ndarray:
    t = t - t.mean(axis=1, keepdims=True)
    return t / np.maximum(t.std(axis=1, keepdims=True), 1e-6)


@dataclass
class OrientationCheck:
    template: np.ndarray  # (THUMB, THUMB), standardised mean training thumbnail
    margin: float = DEFAULT_MARGIN
    info: dict[str, Any] = field(default_factory=dict)

    def correlations(self, batch: Any) -> np.ndarray:
        """(N, 8) correlations with the template turned k quarter turns (k = 0..3), then
        the same negated."""
        size = self.template.shape[0]
        turned = np.stack([np.rot90(self.template, k).ravel() for k in range(4)])
        r = thumbnails(batch, size) @ _standardise(turned).T / turned.shape[1]
        return np.concatenate([r, -r], axis=1)

    def assess(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(code, best correlation, upright correlation) per image; code 0 = not warned,
        else the best-fitting alternative (quarter turns + 4 * negated)."""
        r = self.correlations(batch)
        best = r.argmax(axis=1)
        top = r[np.arange(len(r)), best]
        code = np.where((best != 0) & (top - r[:, 0] > self.margin), best, 0)
        return code, top, r[:, 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "Pearson correlation of the standardised thumbnail with the mean training thumbnail, "
            "upright vs turned by 90/180/270 degrees and negated; warned when an alternative fits better "
            "than upright by more than margin",
            "size": int(self.template.shape[0]),
            "margin": float(self.margin),
            "template": [round(float(v), 4) for v in self.template.ravel()],
            **self.info,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "OrientationCheck":
        try:
            size = int(d["size"])
            template = np.asarray(d["template"], dtype=np.float64).reshape(size, size)
            margin = float(d["margin"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{source}: the bundle's orientation check is incomplete ({exc})") from None
        if not np.all(np.isfinite(template)) or size < 4 or not np.isfinite(margin):
            raise BundleError(f"{source}: the orientation check's template or margin is not valid")
        info = {k: v for k, v in d.items() if k not in ("method", "size", "margin", "template")}
        return cls(template, margin, info)


def orientation_warning(code: int, best: float, upright: float) -> str | None:
    if code == 0:
        return None
    turn, negated = _TURNS[code % 4], code >= 4
    what = ("inverted (a negative)" + (f" and {turn}" if code % 4 else "")) if negated else turn
    return (
        f"appears {what}: its layout matches the training X-rays that way "
        f"(correlation {best:.2f}, upright {upright:.2f}); turn it upright before reading the findings"
    )


def fit_orientation(
    train: Any, val: Any | None = None, *, margin: float = DEFAULT_MARGIN, info: dict[str, Any] | None = None
) -> OrientationCheck:
    """Template = mean standardised thumbnail of the training inputs (`train`: model inputs or
    thumbnails from `thumbnails`), refitted once without the training images that already
    look turned (NIH itself holds a few percent of radiographs stored on their side).
    `val`: reports the share of validation images warned (not used to fit)."""
    t = train if np.asarray(train).ndim == 2 else thumbnails(train)
    size = int(round(np.sqrt(t.shape[1])))
    check = OrientationCheck(_standardise(t.mean(axis=0)[None])[0].reshape(size, size), margin)
    code = check.assess(t.reshape(len(t), 1, size, size))[0]
    if (code == 0).sum() >= 2:
        check.template = _standardise(t[code == 0].mean(axis=0)[None])[0].reshape(size, size)
    check.info = {"train_images": int(len(t)), "train_images_left_out_as_turned": int((code != 0).sum())}
    if val is not None:
        v = val if np.asarray(val).ndim == 2 else thumbnails(val)
        warned = check.assess(v.reshape(len(v), 1, size, size))[0] != 0
        check.info.update({"val_images": int(len(v)), "val_warned": int(warned.sum())})
    check.info.update(info or {})
    return check


def orientation_of(meta: BundleMeta | None) -> OrientationCheck | None:
    """The bundle's orientation check, or None (bundles made before it)."""
    d = meta.orientation if meta is not None else None
    return OrientationCheck.from_dict(d, meta.name) if meta is not None and d else None
