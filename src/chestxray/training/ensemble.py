"""`chestxray ensemble`: combine bundles into one ensemble bundle.

Its thresholds are tuned anew, per class F1-optimal, on a split none of the members
trained on (by default the validation split they share).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chestxray.data.transforms import Preprocessing
from chestxray.errors import BundleError, ChestXrayError
from chestxray.models.ensemble import ARCHITECTURE, EnsembleModel

if TYPE_CHECKING:
    from chestxray.data.common import DatasetOptions

log = logging.getLogger(__name__)


def member_record(model: Any, meta: Any) -> dict[str, Any]:
    return {
        "architecture": meta.architecture,
        "name": meta.name,
        "preprocessing": meta.preprocessing.to_dict(),
        "training_split": meta.training.get("split"),
    }


def make_ensemble(
    bundles: Sequence[str | os.PathLike],
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "val",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    name: str | None = None,
    allow_missing: bool = False,
    options: "DatasetOptions | None" = None,
) -> Path:
    """Combine `bundles`, tune thresholds on `split` of `root` (any `NAME:PATH` the data
    layer reads; a bare path is NIH), write the ensemble bundle. `options` (when given)
    replaces `val_fraction`, `split_seed` and `allow_missing`."""
    from chestxray.data.common import DatasetOptions
    from chestxray.data.datasets import open_dataset
    from chestxray.evaluation.evaluate import split_probabilities
    from chestxray.evaluation.metrics import evaluate_predictions
    from chestxray.evaluation.thresholds import tune_thresholds
    from chestxray.inference.predict import Analyzer, TorchBackend
    from chestxray.models.bundle import BundleMeta, load_bundle, save_bundle

    if len(bundles) < 2:
        raise ChestXrayError("an ensemble needs at least two bundles (models=)")
    loaded = [load_bundle(b) for b in bundles]
    labels, size = loaded[0][1].labels, loaded[0][1].preprocessing.size
    for path, (_, meta) in zip(bundles, loaded):
        if meta.labels != labels:
            raise BundleError(f"{path}: its labels differ from {bundles[0]}'s; members must share label order")
        if meta.preprocessing.size != size:
            raise BundleError(
                f"{path}: input size {meta.preprocessing.size} differs from {size}; members must share the input size"
            )
        if meta.architecture == ARCHITECTURE:
            raise BundleError(f"{path}: is itself an ensemble; list its members instead")
        first = loaded[0][1].preprocessing
        if (meta.preprocessing.crop, meta.preprocessing.resize) != (first.crop, first.resize):
            raise BundleError(f"{path}: its crop/resize differ from {bundles[0]}'s; members must read images alike")
    opts = options or DatasetOptions(
        val_fraction=val_fraction, seed=split_seed, allow_missing=allow_missing, views="frontal"
    )
    index = open_dataset(str(root), opts)
    wanted = {"fraction": opts.val_fraction, "seed": opts.seed}
    for path, (_, meta) in zip(bundles, loaded):
        val = (meta.training.get("split") or {}).get("validation") or {}
        if split == "val" and {k: val.get(k) for k in wanted} != wanted:
            log.warning(
                "%s was validated on %s, not on this validation carve %s: its training images may "
                "be in the split the thresholds are tuned on",
                path,
                val or "an unknown split",
                wanted,
            )
    first = loaded[0][1].preprocessing
    pre = Preprocessing(size=size, mean=first.mean, std=first.std, crop=first.crop, resize=first.resize)
    model = EnsembleModel([m for m, _ in loaded], pre).eval()
    name = name or "ensemble-" + "+".join(meta.name for _, meta in loaded)
    analyzer = Analyzer(TorchBackend(model), labels, [0.5] * len(labels), pre, name)
    probs, targets, _, _ = split_probabilities(analyzer, index, split)
    tuned = tune_thresholds(probs, targets, labels)
    metrics = evaluate_predictions(targets, probs, tuned.thresholds, labels, n_boot=0)
    meta = BundleMeta(
        architecture=ARCHITECTURE,
        labels=list(labels),
        preprocessing=pre,
        thresholds=[float(t) for t in tuned.thresholds],
        name=name,
        threshold_method=f"per-class F1-optimal on the {split} split of {index.dataset}:{index.root.name} "
        f"(fallback 0.5 for {tuned.fallback})",
        training={
            "members": [member_record(m, mt) for m, mt in loaded],
            "combination": "mean of member probabilities",
            "thresholds_tuned_on": {
                "dataset": index.dataset,
                "root": Path(index.root).resolve().name,
                "split": split,
                **wanted,
            },
        },
        metrics={split if split != "val" else "validation": metrics},
    )
    return save_bundle(model, meta, out)
