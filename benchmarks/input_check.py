"""The input check of a bundle: how well it separates real held-out radiographs from
inputs that are not chest X-rays, and what it costs per image.

    python benchmarks/input_check.py --root ../shared/nih-sample [--model BUNDLE] [--onnx FILE]

Held-out radiographs: the official test split of --root (never used for training,
validation or the cut-off), and the untouched 1024 px originals under ROOT/originals (the
same pictures before NIH's resizing; some are training images). Non-radiographs:
scikit-image's bundled sample pictures, rendered text, noise and a colour chart
(tests/ood_inputs.py); also each of the first 40 held-out radiographs inverted and turned
90 degrees counter-clockwise, 180 degrees and 90 degrees clockwise. Reports the AUROC of the
score at telling held-out radiographs from non-radiographs, the share warned in each group
by the feature check (score above the bundle's cut-off), by the orientation check and by
either (what predict's warnings show), and the time per image of the score alone, of the
orientation check alone and of a whole prediction with and without the feature check (one
thread, batches of 16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="NIH root whose test split gives the held-out radiographs")
    ap.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    ap.add_argument("--onnx", default=None, help="also score with this ONNX file (its graph's score output)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score

    from chestxray.data.images import read_image
    from chestxray.data.index import load_nih
    from chestxray.inference.features import pooled_features
    from chestxray.inference.input_check import load_input_check
    from chestxray.inference.predict import Analyzer, default_bundle_path
    from chestxray.models.bundle import resolve_bundle_path
    from ood_inputs import altered_radiographs, non_radiographs

    torch.set_num_threads(args.threads)
    path = resolve_bundle_path(args.model) if args.model else default_bundle_path()
    analyzer = Analyzer.load(path)
    check = load_input_check(analyzer.meta, path)
    if check is None:
        raise SystemExit(f"{path}: this bundle has no input check (fit one with `chestxray tune --input-check-split`)")
    index = load_nih(args.root, val_fraction=0.15, allow_missing=True)
    pos = index.split_positions("test")
    held = [(str(n), read_image(p)) for n, p in zip(index.frame["image"].iloc[pos], index.frame["path"].iloc[pos])]
    groups = {"held-out radiographs": held}
    originals = sorted((Path(args.root) / "originals").glob("*.png"))
    if originals:
        groups["untouched originals"] = [(p.name, read_image(p)) for p in originals]
    groups["non-radiographs"] = non_radiographs()
    altered = altered_radiographs(held[:40])
    groups["inverted radiographs"] = altered[0::2]
    groups["rotated radiographs"] = altered[1::2]  # 90 degrees counter-clockwise
    groups["upside-down radiographs"] = [(f"rot180:{n}", np.rot90(g, 2).copy()) for n, g in held[:40]]
    groups["rotated clockwise radiographs"] = [(f"rot270:{n}", np.rot90(g, 3).copy()) for n, g in held[:40]]

    probs_seen: dict[tuple[int, int], list[np.ndarray]] = {}  # (analyzer, group) -> probabilities

    def checks_of(an: Analyzer, items: list) -> np.ndarray:
        out = []
        for i in range(0, len(items), 16):
            batch = np.stack([an.preprocess(g)[1] for _, g in items[i : i + 16]])
            probs, checks = an.run(batch)
            probs_seen.setdefault((id(an), id(items)), []).append(probs)
            out.append(checks)
        return np.concatenate(out)

    cut = check.cutoff

    def shares(c: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        return {
            k: {
                "feature_check": float(np.mean(v["score"] > cut)),
                "orientation": float(np.mean(v["turn"] != 0)),
                "either": float(np.mean((v["score"] > cut) | (v["turn"] != 0))),
            }
            for k, v in c.items()
        }

    checks = {k: checks_of(analyzer, v) for k, v in groups.items()}
    scores = {k: v["score"] for k, v in checks.items()}
    y = np.r_[np.zeros(len(scores["held-out radiographs"])), np.ones(len(scores["non-radiographs"]))]
    auroc = float(roc_auc_score(y, np.r_[scores["held-out radiographs"], scores["non-radiographs"]]))
    warned = shares(checks)
    missed = [n for (n, _), s in zip(groups["non-radiographs"], scores["non-radiographs"]) if s <= cut]
    real = np.concatenate([checks[k] for k in ("held-out radiographs", "untouched originals") if k in checks])
    real_warned = float(np.mean((real["score"] > cut) | (real["turn"] != 0)))

    # Orientation: the template's gain (best alternative - upright correlation) against a
    # symmetry statistic (top-bottom minus left-right mirror correlation of the thumbnail),
    # as AUROC of held-out radiographs against each turned group.
    separation: dict[str, dict[str, float]] = {}
    if analyzer.orientation is not None:
        from chestxray.inference.orientation import thumbnails

        def orientation_stats(items: list) -> tuple[np.ndarray, np.ndarray]:
            x = np.stack([analyzer.preprocess(g)[1] for _, g in items])
            _, best, upright = analyzer.orientation.assess(x)
            t = thumbnails(x).reshape(len(x), 32, 32)
            symmetry = (t * t[:, ::-1, :]).mean((1, 2)) - (t * t[:, :, ::-1]).mean((1, 2))
            return best - upright, symmetry

        base = orientation_stats(groups["held-out radiographs"])
        turned = ("rotated radiographs", "upside-down radiographs", "rotated clockwise radiographs")
        for k in turned:
            other = orientation_stats(groups[k])
            yy = np.r_[np.zeros(len(base[0])), np.ones(len(other[0]))]
            separation[k] = {
                "template_gain_auroc": float(roc_auc_score(yy, np.r_[base[0], other[0]])),
                "symmetry_auroc": float(roc_auc_score(yy, np.r_[base[1], other[1]])),
            }

    # Cost: the score alone on captured features, and whole predictions with / without it.
    batch = np.stack([analyzer.preprocess(g)[1] for _, g in held[:16]])
    model = analyzer.model
    _, feats = pooled_features(model, batch, check.layers)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        check.score(feats)
    score_ms = (time.perf_counter() - t0) / (reps * len(batch)) * 1e3
    orientation_ms = float("nan")
    if analyzer.orientation is not None:
        t0 = time.perf_counter()
        for _ in range(reps):
            analyzer.orientation.assess(batch)
        orientation_ms = (time.perf_counter() - t0) / (reps * len(batch)) * 1e3
    plain = Analyzer.load(path)
    plain.backend.input_score = None  # the same model without the check
    plain.backend.has_score = False

    def per_image(an: Analyzer) -> float:
        an.run(batch)
        t = time.perf_counter()
        for _ in range(3):
            an.run(batch)
        return (time.perf_counter() - t) / (3 * len(batch)) * 1e3

    with_ms, without_ms = per_image(analyzer), per_image(plain)
    result = {
        "model": analyzer.name,
        "cutoff": cut,
        "images": {k: len(v) for k, v in groups.items()},
        "auroc_heldout_vs_nonradiographs": auroc,
        "warned": warned,
        "real_radiographs_warned_either_check": real_warned,
        "orientation_separation": separation or None,
        "orientation": {k: v for k, v in (analyzer.meta.orientation or {}).items() if k != "template"},
        "non_radiographs_not_warned": missed,
        "score_percentiles": {k: [float(np.percentile(v, q)) for q in (0, 50, 100)] for k, v in scores.items()},
        "ms_per_image": {
            "score_only": score_ms,
            "orientation_only": orientation_ms,
            "predict_with_check": with_ms,
            "predict_without_check": without_ms,
        },
        "threads": args.threads,
    }
    if args.onnx:
        onnx = Analyzer.load(args.onnx)
        oc = {k: checks_of(onnx, v) for k, v in groups.items()}
        o = {k: v["score"] for k, v in oc.items()}
        result["onnx"] = {
            "warned": shares(oc),
            # Probabilities: int8 was calibrated on radiographs, so only they are compared.
            "max_abs_probability_diff_vs_torch_heldout": float(
                np.max(
                    np.abs(
                        np.concatenate(probs_seen[id(onnx), id(held)])
                        - np.concatenate(probs_seen[id(analyzer), id(held)])
                    )
                )
            ),
            "max_rel_diff_vs_torch": float(
                max(np.max(np.abs(o[k] - scores[k]) / np.maximum(scores[k], 1e-6)) for k in o)
            ),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
