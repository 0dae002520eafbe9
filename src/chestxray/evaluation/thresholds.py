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


# Operating points: a named policy per finding, on validation.
POLICY_HELP = "f1 | youden | sensitivity=0.90 | specificity=0.95 | ppv=0.80 (per finding, on validation)"


def parse_policy(text: str) -> tuple[str, float | None]:
    """'f1', 'youden', or 'sensitivity|specificity|ppv=VALUE' -> (kind, value)."""
    kind, _, value = text.strip().partition("=")
    kind = kind.strip().lower()
    if kind in ("f1", "youden") and not value:
        return kind, None
    if kind in ("sensitivity", "specificity", "ppv") and value:
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if 0.0 < v < 1.0:
            return kind, v
    shown = text if len(text) <= 60 else text[:60] + "..."
    raise ValueError(f"threshold policy {shown!r}: expected {POLICY_HELP}, with a value strictly between 0 and 1")


def _cuts(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct cut, from "nothing positive" down to "everything positive":
    (thresholds, sensitivity, specificity, ppv). Thresholds sit midway between distinct
    scores, so "positive iff p >= threshold" has a margin on both sides."""
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(t)[last], np.cumsum(~t)[last]
    idx = np.flatnonzero(last)
    lower = np.r_[s[idx[:-1] + 1], max(0.0, s[-1] - 1e-6)]
    thr = np.r_[min(1.0, (s[0] + 1.0) / 2.0), (s[idx] + lower) / 2.0]
    tp, fp = np.r_[0, tp], np.r_[0, fp]
    n_pos, n_neg = max(int(t.sum()), 1), max(int((~t).sum()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ppv = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
    return thr, tp / n_pos, 1.0 - fp / n_neg, ppv


def policy_threshold(scores: np.ndarray, targets: np.ndarray, policy: str) -> dict[str, float | bool]:
    """One finding's threshold under `policy`, with the validation sensitivity and
    specificity it achieves, and whether the policy's target was reached."""
    kind, value = parse_policy(policy)
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    if not y.any() or y.all():
        raise ValueError("needs positive and negative examples")
    thr, sens, spec, ppv = _cuts(scores, y)
    reached = True
    if kind == "f1":
        t, _ = best_f1_threshold(scores, y)
        k = int(np.argmin(np.abs(thr - t)))
        thr = thr.copy()
        thr[k] = t
    elif kind == "youden":
        k = int(np.argmax(sens + spec - 1.0))
    elif kind == "sensitivity":
        k = int(np.flatnonzero(sens >= value)[0])  # the most specific cut that reaches it
    elif kind == "specificity":
        k = int(np.flatnonzero(spec >= value)[-1])  # the most sensitive cut that keeps it
    else:
        ok = np.flatnonzero(np.nan_to_num(ppv, nan=-1.0) >= value)
        reached = len(ok) > 0
        k = int(ok[-1]) if reached else int(np.nanargmax(ppv))
    return {
        "threshold": float(np.clip(thr[k], 0.0, 1.0)),
        "sensitivity": float(sens[k]),
        "specificity": float(spec[k]),
        "reached": bool(reached),
    }


def tune_operating_point(
    probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], policy: str, source: str = ""
) -> tuple[np.ndarray, dict]:
    """Per-finding thresholds under `policy` and the bundle's `operating_point` record."""
    parse_policy(policy)
    out = np.full(len(labels), FALLBACK_THRESHOLD)
    per: dict[str, dict] = {}
    fallback = []
    for c, name in enumerate(labels):
        keep = ~np.isnan(np.asarray(targets[:, c], dtype=np.float64))  # unlabelled (NaN) rows left out
        try:
            entry = policy_threshold(probs[keep, c], targets[keep, c], policy)
        except ValueError:
            fallback.append(name)
            per[name] = {"threshold": FALLBACK_THRESHOLD, "sensitivity": None, "specificity": None, "reached": False}
            continue
        out[c] = entry["threshold"]
        per[name] = entry
    record = {
        "policy": policy,
        "tuned_on": source,
        "images": int(len(probs)),
        "per_finding": per,
        "fallback_0.5": fallback,
        "not_reached": [n for n, e in per.items() if not e["reached"] and n not in fallback],
    }
    return out, record
