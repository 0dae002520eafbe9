"""How much each calibrator helps, measured on a bundle's raw (uncalibrated) scores.

    python benchmarks/calibration.py --root ../shared/nih-sample [--model BUNDLE] [--val-fraction 0.15]

Candidates: the three `--calibrate` methods (none, per-finding temperature, per-finding
Platt) and three lower-variance variants evaluated here only: one temperature shared by all
findings; per-finding temperature shrunk toward T = 1 (penalty 0.05 (log T)^2 on the mean
NLL); Platt with Platt's (1999) smoothed targets ((N+ + 1)/(N+ + 2) and 1/(N- + 2)).

1. Selection, on non-test data only: 5-fold cross-validation by patient within the
   validation split (the only images the weights never trained on apart from the test part),
   repeated over 10 patient shuffles; out-of-fold macro ECE, Brier and NLL.
2. Fitted on the whole validation split, measured once on the official test split (what
   shipping a calibrator does), with the test ECE's sensitivity to the binning (10, 15, 20
   equal-width bins; 15 equal-mass bins; the raw logits scaled by 0.95-1.05), a
   patient-bootstrap 95% interval of the change in macro ECE against no calibrator, and per
   finding.
3. 2-fold by patient within the test split: fitted on half of its patients, measured on the
   other half (what `chestxray tune` on a site's own data does when that site's case mix
   differs from the training data's).
ECE as `chestxray evaluate` reports it: 15 equal-width bins, macro mean over findings.
AUROC is unchanged by construction (checked).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np

SHRINK = 0.05  # the shrunk temperature's penalty weight


def _shared_temperature(probs: np.ndarray, targets: np.ndarray, labels: list[str]) -> Any:
    from chestxray.evaluation.calibration import fit_temperature, logits_of
    from chestxray.inference.calibration import Calibration

    a, _ = fit_temperature((targets > 0.5).ravel().astype(float), logits_of(probs).ravel())
    return Calibration("temperature", labels, np.full(len(labels), a), np.zeros(len(labels)))


def _shrunk_temperature(probs: np.ndarray, targets: np.ndarray, labels: list[str]) -> Any:
    from scipy.optimize import minimize_scalar

    from chestxray.evaluation.calibration import logits_of
    from chestxray.inference.calibration import Calibration

    z, y = logits_of(probs), (targets > 0.5).astype(float)
    a = np.ones(len(labels))
    for c in range(len(labels)):
        if 0 < y[:, c].sum() < len(y):
            zc, yc = z[:, c], y[:, c]
            res = minimize_scalar(
                lambda lt, zc=zc, yc=yc: (
                    np.mean(np.logaddexp(0, zc * np.exp(-lt)) - yc * zc * np.exp(-lt)) + SHRINK * lt**2
                ),
                bounds=(np.log(0.05), np.log(20.0)),
                method="bounded",
            )
            a[c] = np.exp(-res.x)
    return Calibration("temperature", labels, a, np.zeros(len(labels)))


def _platt_smoothed(probs: np.ndarray, targets: np.ndarray, labels: list[str]) -> Any:
    from scipy.optimize import minimize

    from chestxray.evaluation.calibration import logits_of
    from chestxray.inference.calibration import Calibration

    z, y = logits_of(probs), targets > 0.5
    a, b = np.ones(len(labels)), np.zeros(len(labels))
    for c in range(len(labels)):
        pos = int(y[:, c].sum())
        neg = len(y) - pos
        if pos == 0 or neg == 0:
            continue
        t = np.where(y[:, c], (pos + 1) / (pos + 2), 1 / (neg + 2))

        def loss(ab: np.ndarray, zc: np.ndarray = z[:, c], t: np.ndarray = t) -> float:
            s = ab[0] * zc + ab[1]
            return float(np.mean(np.logaddexp(0, s) - t * s))

        res = minimize(loss, np.array([1.0, 0.0]), method="L-BFGS-B")
        if res.x[0] > 1e-3:
            a[c], b[c] = res.x
    return Calibration("platt", labels, a, b)


def equal_mass_ece(y: np.ndarray, p: np.ndarray, bins: int = 15) -> float:
    """ECE with bins of equal image count (sorted by probability), for the sensitivity check."""
    order = np.argsort(p, kind="stable")
    parts = [q for q in np.array_split(order, bins) if len(q)]
    return float(sum(len(q) * abs((y[q] > 0.5).mean() - p[q].mean()) for q in parts) / len(p))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="the carve the bundle was trained with")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=10, help="patient shuffles of the 5-fold CV")
    ap.add_argument("--boot", type=int, default=1000, help="patient-bootstrap replicates on the test split")
    args = ap.parse_args()

    from sklearn.model_selection import GroupKFold

    from chestxray.data.index import load_nih
    from chestxray.evaluation.calibration import ece, fit_calibration, logits_of
    from chestxray.evaluation.metrics import mean_auroc
    from chestxray.evaluation.tune import raw_split_outputs
    from chestxray.inference.predict import default_bundle_path
    from chestxray.models.bundle import load_bundle

    model, meta = load_bundle(args.model or default_bundle_path())
    index = load_nih(args.root, val_fraction=args.val_fraction, seed=args.split_seed, allow_missing=True)
    val = raw_split_outputs(model, meta, index, "val", False)
    test = raw_split_outputs(model, meta, index, "test", False)
    labels = list(meta.labels)

    def library(method: str) -> Callable[[np.ndarray, np.ndarray, list[str]], Any]:
        return lambda p, y, lab: fit_calibration(p, y, lab, method)

    candidates = {
        "none": library("none"),
        "temperature": library("temperature"),
        "platt": library("platt"),
        "shared temperature": _shared_temperature,
        "temperature shrunk to 1": _shrunk_temperature,
        "platt, smoothed targets": _platt_smoothed,
    }

    def per_finding_ece(y: np.ndarray, p: np.ndarray, fn: Callable[..., float] = ece) -> np.ndarray:
        return np.array([fn(y[:, c], p[:, c]) for c in range(len(labels))])

    def macro(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        yb = (y > 0.5).astype(float)
        z = logits_of(p)
        return {
            "ece": float(per_finding_ece(y, p).mean()),
            "brier": float(np.mean((p - yb) ** 2)),
            "nll": float(np.mean(np.logaddexp(0, z) - yb * z)),
        }

    def cross_fit(out: Any, folds: int, fit: Callable[..., Any], groups: np.ndarray) -> np.ndarray:
        oof = np.zeros_like(out.probs)
        for tr, te in GroupKFold(folds).split(out.probs, out.targets, groups):
            oof[te] = fit(out.probs[tr], out.targets[tr], labels).apply_probabilities(out.probs[te])
        return oof

    rng = np.random.default_rng(0)
    patients = np.unique(val.patients)
    shuffles = [dict(zip(patients, rng.permutation(len(patients)))) for _ in range(args.repeats)]
    test_patients = np.unique(test.patients)
    rows = {u: np.flatnonzero(test.patients == u) for u in test_patients}
    boots = [np.concatenate([rows[u] for u in rng.choice(test_patients, len(test_patients))]) for _ in range(args.boot)]
    raw_boot = np.array([per_finding_ece(test.targets[s], test.probs[s]).mean() for s in boots])

    result: dict[str, dict[str, Any]] = {}
    for name, fit in candidates.items():
        cv = [macro(val.targets, cross_fit(val, 5, fit, np.array([m[p] for p in val.patients]))) for m in shuffles]
        cal = fit(val.probs, val.targets, labels)
        on_test = cal.apply_probabilities(test.probs)
        assert abs(mean_auroc(test.targets, on_test) - mean_auroc(test.targets, test.probs)) < 1e-12
        diff = np.array([per_finding_ece(test.targets[s], on_test[s]).mean() for s in boots]) - raw_boot
        result[name] = {
            "val_5fold_cv": {k: float(np.mean([c[k] for c in cv])) for k in cv[0]},
            "val_5fold_cv_ece_sd": float(np.std([c["ece"] for c in cv])),
            "val_to_test": macro(test.targets, on_test),
            "val_to_test_ece_binnings": {
                "10 equal-width": float(per_finding_ece(test.targets, on_test, lambda y, p: ece(y, p, 10)).mean()),
                "20 equal-width": float(per_finding_ece(test.targets, on_test, lambda y, p: ece(y, p, 20)).mean()),
                "15 equal-mass": float(per_finding_ece(test.targets, on_test, equal_mass_ece).mean()),
            },
            "val_to_test_ece_change_vs_none_95ci": [float(np.percentile(diff, q)) for q in (2.5, 97.5)],
            "val_to_test_ece_per_finding": dict(zip(labels, per_finding_ece(test.targets, on_test).round(4).tolist())),
            "slopes": cal.a.round(3).tolist(),
            "test_2fold_site": macro(test.targets, cross_fit(test, 2, fit, test.patients)),
        }
    prevalence = {
        lab: {"val": float((val.targets[:, c] > 0.5).mean()), "test": float((test.targets[:, c] > 0.5).mean())}
        for c, lab in enumerate(labels)
    }
    # How much the 15-bin ECE moves under a uniform 1-5% change of the raw logits' scale (bin edges).
    sweep = {
        f"{a:.2f}": float(per_finding_ece(test.targets, 1 / (1 + np.exp(-a * logits_of(test.probs)))).mean())
        for a in (0.95, 0.98, 0.99, 1.0, 1.01, 1.02, 1.05)
    }
    summary = {
        "model": meta.name,
        "val_images": len(val.probs),
        "test_images": len(test.probs),
        "cv_repeats": args.repeats,
        "bootstrap": args.boot,
        "prevalence": prevalence,
        "macro": result,
        "test_ece_raw_logits_scaled_by": sweep,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
