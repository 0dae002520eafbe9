"""Evaluation metrics for multi-label predictions, with patient-level bootstrap CIs.

AUROC and AUPRC come from scikit-learn. A class whose evaluation set has no positive
(or no negative) has an undefined AUROC: it is reported as None, never as 0 or 1.
Confidence intervals resample patients (not images), since images of one patient
are correlated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _auroc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    from sklearn.metrics import roc_auc_score

    pos = y > 0.5
    if w is not None:
        if w[pos].sum() == 0 or w[~pos].sum() == 0:
            return float("nan")
    elif pos.all() or not pos.any():
        return float("nan")
    return float(roc_auc_score(pos, p, sample_weight=w))


def _auprc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    from sklearn.metrics import average_precision_score

    pos = y > 0.5
    if (w[pos].sum() if w is not None else pos.sum()) == 0:
        return float("nan")
    return float(average_precision_score(pos, p, sample_weight=w))


def _known(y: np.ndarray) -> np.ndarray:
    """Rows where a label is known (NaN = unknown: scored on the images that label it)."""
    return ~np.isnan(y)


def per_class_auroc(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    targets = np.asarray(targets, dtype=np.float64)
    out = []
    for c in range(targets.shape[1]):
        k = _known(targets[:, c])
        out.append(_auroc(targets[k, c], probs[k, c]))
    return np.array(out)


def macro_mean(values: Sequence[float | None] | np.ndarray) -> float:
    """Mean over the classes where the metric is defined (None/NaN left out); NaN if none is."""
    vals = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def mean_auroc(targets: np.ndarray, probs: np.ndarray) -> float:
    """Macro mean AUROC over the classes where it is defined (NaN if none): the model
    selection metric of training, evaluation and the int8 comparison."""
    return macro_mean(per_class_auroc(targets, probs))


def elementwise_accuracy(targets: np.ndarray, predicted: np.ndarray) -> float:
    """Share of (image, finding) cells predicted right: the seed's 94.7% metric. Cells with an
    unknown label (NaN) are not counted."""
    targets = np.asarray(targets, dtype=np.float64)
    known = _known(targets)
    if not known.any():
        return float("nan")
    return float(((predicted > 0.5) == (targets > 0.5))[known].mean())


def _confusion(y: np.ndarray, yhat: np.ndarray) -> dict[str, float | None]:
    y, yhat = y > 0.5, yhat > 0.5
    tp, fp = int((y & yhat).sum()), int((~y & yhat).sum())
    fn, tn = int((y & ~yhat).sum()), int((~y & ~yhat).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn) if (tp + fn) else None
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": f1,
    }


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def weighted_auroc_auprc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of one class under many weightings at once.

    y, p: (n,); weights: (B, n) non-negative (bootstrap counts). Returns two (B,) arrays,
    NaN where a weighting leaves no positive (or, for AUROC, no negative). Equal to
    scikit-learn's roc_auc_score / average_precision_score with sample_weight (tests check
    this); hand-written because 1,000 replicates x 14 classes of sklearn calls take minutes.
    """
    order = np.argsort(-p, kind="mergesort")  # descending score
    ps, ys = p[order], y[order] > 0.5
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # first index of each tie group
    w = weights[:, order]
    pos_g = np.add.reduceat(w * ys, starts, axis=1)  # (B, G) weight of positives per score group
    neg_g = np.add.reduceat(w * ~ys, starts, axis=1)
    p_tot, n_tot = pos_g.sum(1), neg_g.sum(1)
    # AUROC: each positive beats the negatives in lower groups, ties count half.
    neg_below = n_tot[:, None] - np.cumsum(neg_g, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (pos_g * (neg_below + 0.5 * neg_g)).sum(1) / (p_tot * n_tot)
        tp, fp = np.cumsum(pos_g, axis=1), np.cumsum(neg_g, axis=1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        auprc = (pos_g * precision).sum(1) / p_tot
    auroc[(p_tot == 0) | (n_tot == 0)] = np.nan
    auprc[p_tot == 0] = np.nan
    return auroc, auprc


def bootstrap_ci(
    targets: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, np.ndarray]:
    """Percentile CIs of per-class AUROC and AUPRC and their macro means, resampling groups
    (patients) with replacement. Each replicate weights images by how often their patient
    was drawn, which equals duplicating them, without copying arrays."""
    import warnings

    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    n_classes = targets.shape[1]
    auroc = np.full((n_boot, n_classes), np.nan)
    auprc = np.full((n_boot, n_classes), np.nan)
    chunk = max(1, int(2e7 // max(len(targets), 1)))  # bound memory on large test sets
    for b0 in range(0, n_boot, chunk):
        nb = min(chunk, n_boot - b0)
        counts = np.stack([np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq)) for _ in range(nb)])
        w = counts[:, inverse].astype(np.float64)
        for c in range(n_classes):
            k = _known(targets[:, c])
            auroc[b0 : b0 + nb, c], auprc[b0 : b0 + nb, c] = weighted_auroc_auprc(targets[k, c], probs[k, c], w[:, k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def pct(a: np.ndarray) -> np.ndarray:
        out = np.full((2, a.shape[1]), np.nan)
        for j in range(a.shape[1]):
            col = a[:, j][np.isfinite(a[:, j])]
            # Too few defined replicates give no meaningful interval.
            if len(col) >= max(10, n_boot // 2):
                out[:, j] = np.percentile(col, [lo, hi])
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows when no class is defined
        macro_auroc = np.nanmean(auroc, axis=1)
        macro_auprc = np.nanmean(auprc, axis=1)
    return {
        "auroc": pct(auroc),
        "auprc": pct(auprc),
        "macro_auroc": pct(macro_auroc[:, None])[:, 0],
        "macro_auprc": pct(macro_auprc[:, None])[:, 0],
    }


def evaluate_predictions(
    targets: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    labels: Sequence[str],
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything `chestxray evaluate` reports, as a JSON-able dict."""
    targets, probs = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    predicted = probs >= thresholds[None, :]
    ci = bootstrap_ci(targets, probs, groups, n_boot=n_boot, seed=seed) if groups is not None and n_boot > 0 else None
    per_class: dict[str, Any] = {}
    for c, name in enumerate(labels):
        known = _known(targets[:, c])  # a finding is scored on the images that label it
        y, p = targets[known, c], probs[known, c]
        entry: dict[str, Any] = {
            "support": int(y.sum()),
            "prevalence": float(y.mean()) if len(y) else None,
            "threshold": float(thresholds[c]),
            "auroc": _nan_to_none(_auroc(y, p)),
            "auprc": _nan_to_none(_auprc(y, p)),
            **_confusion(y, predicted[known, c]),
        }
        if not known.all():
            entry["labelled"] = int(known.sum())
        if ci is not None:
            entry["auroc_ci"] = [_nan_to_none(v) for v in ci["auroc"][:, c]]
            entry["auprc_ci"] = [_nan_to_none(v) for v in ci["auprc"][:, c]]
            if entry["auroc"] is None:
                entry["auroc_ci"] = [None, None]
        per_class[name] = entry

    def macro(key: str) -> float | None:
        return _nan_to_none(macro_mean([v[key] for v in per_class.values()]))

    out: dict[str, Any] = {
        "n_images": int(len(targets)),
        "n_patients": int(len(np.unique(groups))) if groups is not None else None,
        "per_class": per_class,
        "macro": {k: macro(k) for k in ("auroc", "auprc", "f1", "precision", "recall", "specificity")},
        "defined_auroc_classes": int(sum(v["auroc"] is not None for v in per_class.values())),
        "elementwise_accuracy": elementwise_accuracy(targets, predicted),
        "all_negative_accuracy": elementwise_accuracy(targets, np.zeros_like(targets)),
    }
    if ci is not None:
        out["macro"]["auroc_ci"] = [_nan_to_none(v) for v in ci["macro_auroc"]]
        out["macro"]["auprc_ci"] = [_nan_to_none(v) for v in ci["macro_auprc"]]
        out["bootstrap"] = {"replicates": n_boot, "resampled_by": "patient", "level": 0.95, "seed": seed}
    return out
