"""Ensembles: several bundles averaged into one bundle.

The ensemble's probability is the mean of its members' sigmoid outputs; its network
returns the logit of that mean, so everything that takes a bundle (predict, evaluate,
report, serve, ONNX export) takes an ensemble unchanged. Its thresholds are tuned anew,
per class F1-optimal, on a split none of the members trained on (by default the
validation split they share). Grad-CAM is not defined for an ensemble.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chestxray.data.transforms import Preprocessing
from chestxray.errors import BundleError, ChestXrayError

log = logging.getLogger(__name__)
ARCHITECTURE = "ensemble"


class EnsembleModel(nn.Module):
    """Mean of the members' probabilities, returned as a logit. Members share the input size."""

    architecture = ARCHITECTURE

    def __init__(self, members: Sequence[nn.Module], preprocessing: Preprocessing) -> None:
        super().__init__()
        if len(members) < 2:
            raise ChestXrayError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)
        self.preprocessing = preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(probs.clamp(1e-7, 1 - 1e-7))


def member_record(model: Any, meta: Any) -> dict[str, Any]:
    return {"architecture": meta.architecture, "name": meta.name,
            "preprocessing": meta.preprocessing.to_dict(), "training_split": meta.training.get("split")}


def build_ensemble(records: Sequence[dict[str, Any]], num_classes: int, preprocessing: Preprocessing) -> EnsembleModel:
    """The empty network of an ensemble bundle (weights are loaded by the caller)."""
    from chestxray.models import InputNormalize, create_model

    members = []
    for rec in records:
        member = create_model(rec["architecture"], num_classes=num_classes, weights="none", freeze="all",
                              image_size=preprocessing.size)
        pre = Preprocessing.from_dict(rec["preprocessing"])
        member.normalize = InputNormalize(pre.mean, pre.std)
        member.preprocessing = pre
        members.append(member)
    return EnsembleModel(members, preprocessing)


def make_ensemble(bundles: Sequence[str | os.PathLike], root: str | os.PathLike, out: str | os.PathLike, *,
                  split: str = "val", val_fraction: float = 0.1, split_seed: int = 0,
                  name: str | None = None, allow_missing: bool = False) -> Path:
    """Combine `bundles`, tune thresholds on `split` of `root`, write the ensemble bundle."""
    from chestxray.bundle import BundleMeta, load_bundle, save_bundle
    from chestxray.data.index import load_nih
    from chestxray.evaluation import split_probabilities
    from chestxray.metrics import evaluate_predictions
    from chestxray.predict import Analyzer, TorchBackend
    from chestxray.thresholds import tune_thresholds

    if len(bundles) < 2:
        raise ChestXrayError("an ensemble needs at least two --models")
    loaded = [load_bundle(b) for b in bundles]
    labels, size = loaded[0][1].labels, loaded[0][1].preprocessing.size
    for path, (_, meta) in zip(bundles, loaded):
        if meta.labels != labels:
            raise BundleError(f"{path}: its labels differ from {bundles[0]}'s; members must share label order")
        if meta.preprocessing.size != size:
            raise BundleError(f"{path}: input size {meta.preprocessing.size} differs from {size}; "
                              "members must share the input size")
        if meta.architecture == ARCHITECTURE:
            raise BundleError(f"{path}: is itself an ensemble; list its members instead")
    index = load_nih(root, val_fraction=val_fraction, seed=split_seed, allow_missing=allow_missing)
    wanted = {"fraction": val_fraction, "seed": split_seed}
    for path, (_, meta) in zip(bundles, loaded):
        val = (meta.training.get("split") or {}).get("validation") or {}
        if split == "val" and {k: val.get(k) for k in wanted} != wanted:
            log.warning("%s was validated on %s, not on this validation carve %s: its training images may "
                        "be in the split the thresholds are tuned on", path, val or "an unknown split", wanted)
    first = loaded[0][1].preprocessing
    pre = Preprocessing(size=size, mean=first.mean, std=first.std)
    model = EnsembleModel([m for m, _ in loaded], pre).eval()
    name = name or "ensemble-" + "+".join(meta.name for _, meta in loaded)
    analyzer = Analyzer(TorchBackend(model), labels, [0.5] * len(labels), pre, name)
    probs, targets, _, _ = split_probabilities(analyzer, index, split)
    tuned = tune_thresholds(probs, targets, labels)
    metrics = evaluate_predictions(targets, probs, tuned.thresholds, labels, n_boot=0)
    meta = BundleMeta(
        architecture=ARCHITECTURE, labels=list(labels), preprocessing=pre,
        thresholds=[float(t) for t in tuned.thresholds], name=name,
        threshold_method=f"per-class F1-optimal on the {split} split of {Path(root).name} "
                         f"(fallback 0.5 for {tuned.fallback})",
        training={"members": [member_record(m, mt) for m, mt in loaded],
                  "combination": "mean of member probabilities",
                  "thresholds_tuned_on": {"root": Path(root).resolve().name, "split": split, **wanted}},
        metrics={split if split != "val" else "validation": metrics},
    )
    return save_bundle(model, meta, out)
