"""How much each calibrator helps, measured three ways on a bundle's raw (uncalibrated) scores.

    python benchmarks/calibration.py --root ../shared/nih-sample [--model BUNDLE] [--val-fraction 0.15]

1. fitted on the validation split, measured on the official test split (what shipping a
   calibrator does);
2. 5-fold cross-validation by patient within the validation split (the measurement that
   chooses the default without touching the test split);
3. 2-fold by patient within the test split: fitted on half of its patients, measured on the
   other half (what `chestxray tune` on a site's own data does when that site's case mix
   differs from the training data's).
Macro ECE (15 equal-width bins) and Brier; AUROC is unchanged by construction (checked).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="the carve the bundle was trained with")
    ap.add_argument("--split-seed", type=int, default=0)
    args = ap.parse_args()

    from sklearn.model_selection import GroupKFold

    from chestxray.data.index import load_nih
    from chestxray.evaluation.calibration import calibration_metrics, fit_calibration
    from chestxray.evaluation.metrics import mean_auroc
    from chestxray.evaluation.tune import raw_split_outputs
    from chestxray.inference.calibration import METHODS
    from chestxray.inference.predict import default_bundle_path
    from chestxray.models.bundle import load_bundle

    model, meta = load_bundle(args.model or default_bundle_path())
    index = load_nih(args.root, val_fraction=args.val_fraction, seed=args.split_seed, allow_missing=True)
    val = raw_split_outputs(model, meta, index, "val", False)
    test = raw_split_outputs(model, meta, index, "test", False)
    labels = meta.labels

    def macro(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        return calibration_metrics(y, p, labels)["macro"]

    def cross_fit(out: object, folds: int, method: str) -> np.ndarray:
        oof = np.zeros_like(out.probs)  # type: ignore[attr-defined]
        for tr, te in GroupKFold(folds).split(out.probs, out.targets, out.patients):  # type: ignore[attr-defined]
            cal = fit_calibration(out.probs[tr], out.targets[tr], labels, method)  # type: ignore[attr-defined]
            oof[te] = cal.apply_probabilities(out.probs[te])  # type: ignore[attr-defined]
        return oof

    result: dict[str, dict[str, object]] = {}
    for method in METHODS:
        cal = fit_calibration(val.probs, val.targets, labels, method)
        on_test = cal.apply_probabilities(test.probs)
        assert abs(mean_auroc(test.targets, on_test) - mean_auroc(test.targets, test.probs)) < 1e-12
        result[method] = {
            "val_to_test": macro(test.targets, on_test),
            "val_5fold_cv": macro(val.targets, cross_fit(val, 5, method)),
            "test_2fold_site": macro(test.targets, cross_fit(test, 2, method)),
        }
    print(
        json.dumps(
            {"model": meta.name, "val_images": len(val.probs), "test_images": len(test.probs), "macro": result},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
