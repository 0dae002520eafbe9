"""Calibration measured (Brier score, ECE, reliability diagrams) and fitted (temperature or
Platt scaling per finding, on validation). Applying a fitted calibrator is
`chestxray.inference.calibration.Calibration`.

ECE: 15 equal-width bins of the predicted probability on [0, 1]; the weighted mean over
non-empty bins of |observed positive rate - mean predicted probability|, weights = share of
images in the bin. Per finding, and the macro mean over findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.inference.calibration import METHODS, Calibration

ECE_BINS = 15
ECE_BINNING = f"{ECE_BINS} equal-width bins of the predicted probability on [0, 1], weighted by bin size"
_EPS = 1e-7


def logits_of(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(np.asarray(y) > 0.5, np.asarray(p, dtype=np.float64)))


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: count, mean predicted probability, observed positive rate."""
    y, p = np.asarray(y, dtype=np.float64) > 0.5, np.asarray(p, dtype=np.float64)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=bins) / count
        rate = np.bincount(idx, weights=y.astype(np.float64), minlength=bins) / count
    return {"count": count, "confidence": conf, "observed": rate}


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    r = reliability_bins(y, p, bins)
    full = r["count"] > 0
    return float(np.sum(r["count"][full] * np.abs(r["observed"][full] - r["confidence"][full])) / r["count"].sum())


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def calibration_metrics(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Brier and ECE per finding and macro, as a JSON-able dict."""
    per: dict[str, Any] = {}
    for c, name in enumerate(labels):
        known = ~np.isnan(np.asarray(targets[:, c], dtype=np.float64))  # blank = unknown, not negative
        y, p = targets[known, c], probs[known, c]
        per[name] = {"brier": brier(y, p), "ece": ece(y, p)} if known.any() else {"brier": None, "ece": None}
    return {
        "binning": ECE_BINNING,
        "per_class": per,
        "macro": {k: _mean_defined([v[k] for v in per.values()]) for k in ("brier", "ece")},
    }


def write_reliability(targets: np.ndarray, probs: np.ndarray, labels: list[str], out: Path, title: str) -> Path:
    """One panel per finding (like the ROC grid): observed rate against mean predicted
    probability per bin, marker area ~ images in the bin, the diagonal for reference."""
    from chestxray.evaluation.figures import finish_panels, panel_figure
    from chestxray.io import atomic_write

    fig, axes = panel_figure(len(labels))
    for c, name in enumerate(labels):
        ax = axes[c]
        known = ~np.isnan(np.asarray(targets[:, c], dtype=np.float64))
        if not known.any():
            ax.set_title(f"{name} (no labelled image)", fontsize=9)
            continue
        y, p = targets[known, c], probs[known, c]
        r = reliability_bins(y, p)
        full = r["count"] > 0
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.scatter(r["confidence"][full], r["observed"][full], s=8 + 200 * r["count"][full] / r["count"].sum())
        ax.plot(r["confidence"][full], r["observed"][full], lw=0.8)
        ax.set_title(f"{name} (ECE {ece(y, p):.3f})", fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=7)
        ax.set_ylabel("observed rate", fontsize=7)
    finish_panels(fig, axes, len(labels), f"Reliability ({ECE_BINS} equal-width bins) - {title}")
    path = out / "reliability.png"
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return path


def _nll(y: np.ndarray, z: np.ndarray) -> float:
    # Binary cross-entropy from logits, stable for large |z|.
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """(a = 1/T, 0) minimising the validation NLL; T searched on [0.05, 20]."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda log_t: _nll(y, z / np.exp(log_t)), bounds=(np.log(0.05), np.log(20.0)), method="bounded"
    )
    return float(np.exp(-res.x)), 0.0


def fit_platt(y: np.ndarray, z: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of a logistic regression on the logit (scikit-learn, nearly unregularised);
    None when the slope is not positive (it would reverse or flatten the ranking)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=1000).fit(z[:, None], y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return (a, b) if a > 1e-3 else None


def fit_calibration(
    probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], method: str, fitted_on: str = ""
) -> Calibration:
    """Per-finding calibrator on validation probabilities (uncalibrated). A finding with no
    positive or no negative keeps the identity; a Platt fit with a non-positive slope falls
    back to temperature for that finding."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    t_all = np.asarray(targets, dtype=np.float64)
    labelled = ~np.isnan(t_all)  # an external dataset may not label some findings (NaN)
    y_all = t_all > 0.5
    z_all = logits_of(probs)
    a, b = np.ones(len(labels)), np.zeros(len(labels))
    identity, fallback = [], []
    for c, name in enumerate(labels):
        keep = labelled[:, c]
        y, z = y_all[keep, c].astype(np.float64), z_all[keep, c]
        if method == "none":
            continue
        if len(y) == 0 or y.all() or not y.any():
            identity.append(name)
            continue
        fit = fit_platt(y, z) if method == "platt" else None
        if method == "platt" and fit is None:
            fallback.append(name)
        a[c], b[c] = fit or fit_temperature(y, z)
    cal = Calibration(method, list(labels), a, b)
    after = cal.apply_logits(z_all)
    rows = labelled.all(axis=1)
    cal.info = {
        "fitted_on": fitted_on,
        "images": int(len(y_all)),
        "identity_for": identity,
        "temperature_fallback_for": fallback,
        "fit_split_ece_macro": {  # on the images labelled for every finding
            "before": calibration_metrics(y_all[rows], np.asarray(probs)[rows], labels)["macro"]["ece"],
            "after": calibration_metrics(y_all[rows], after[rows], labels)["macro"]["ece"],
        }
        if rows.any()
        else {},
        "ece_binning": ECE_BINNING,
    }
    return cal
