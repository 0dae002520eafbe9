"""Per-class decision thresholds, each the one that maximises that class's F1 on validation.

Exact search: sort the scores once and evaluate F1 at every distinct score (O(n log n)
per class), rather than a grid that could miss the optimum. The threshold returned is
the midpoint between the chosen score and the next lower distinct score, so "positive
iff probability >= threshold" reproduces the optimum with a margin on both sides.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# A class with no positive in validation has no F1 to maximise; 0.5 on the sigmoid is
# the model's own decision boundary and the conventional default.
FALLBACK_THRESHOLD = 0.5


@dataclass
class ThresholdResult:
    thresholds: np.ndarray  # (C,)
    f1: np.ndarray  # (C,) validation F1 at that threshold; NaN where undefined
    fallback: list[str]  # classes that got FALLBACK_THRESHOLD


def best_f1_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 for one class; raises ValueError with no positives."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets) > 0.5
    n_pos = int(targets.sum())
    if n_pos == 0:
        raise ValueError("no positive examples")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # Only cut after the last of a run of equal scores (ties go together).
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp, fp, idx = tp[last_of_run], fp[last_of_run], np.flatnonzero(last_of_run)
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    k = int(np.argmax(f1))
    chosen = s[idx[k]]
    below = s[idx[k] + 1] if idx[k] + 1 < len(s) else max(0.0, chosen - 1e-6)
    return float((chosen + below) / 2.0), float(f1[k])


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> ThresholdResult:
    """Per-class F1-optimal thresholds for (N, C) probabilities and 0/1 targets; NaN targets
    (unknown) are left out of their class's search."""
    probs, targets = np.asarray(probs), np.asarray(targets)
    if probs.shape != targets.shape or probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be (N, {len(labels)})")
    out = np.full(len(labels), FALLBACK_THRESHOLD)
    f1 = np.full(len(labels), np.nan)
    fallback: list[str] = []
    for c, name in enumerate(labels):
        known = ~np.isnan(targets[:, c].astype(np.float64))
        if targets[known, c].sum() == 0:
            fallback.append(name)
            continue
        out[c], f1[c] = best_f1_threshold(probs[known, c], targets[known, c])
    if fallback:
        log.warning(
            "no positive validation example for %s: threshold set to %.2f", ", ".join(fallback), FALLBACK_THRESHOLD
        )
    return ThresholdResult(np.clip(out, 0.0, 1.0), f1, fallback)
