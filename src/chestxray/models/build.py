"""One way to rebuild a network from bundle metadata: used by `load_bundle` for plain
bundles, and for each member of an ensemble bundle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from chestxray.data.transforms import Preprocessing
from chestxray.models.ensemble import ARCHITECTURE as ENSEMBLE
from chestxray.models.ensemble import EnsembleModel
from chestxray.models.registry import InputNormalize, create_model


def build_from_meta(
    architecture: str,
    num_classes: int,
    preprocessing: Preprocessing,
    members: Sequence[Mapping[str, Any]] | None = None,
) -> nn.Module:
    """The empty network (random weights, every parameter trainable) that a bundle's
    weights are loaded into. `members`: an ensemble's member records."""
    if architecture == ENSEMBLE:
        nets = [
            build_from_meta(
                str(rec["architecture"]),
                num_classes,
                replace(Preprocessing.from_dict(rec["preprocessing"]), size=preprocessing.size),
            )
            for rec in members or []
        ]
        return EnsembleModel(nets, preprocessing)
    model = create_model(
        architecture, num_classes=num_classes, weights="none", freeze="all", image_size=preprocessing.size
    )
    model.normalize = InputNormalize(preprocessing.mean, preprocessing.std)
    model.preprocessing = preprocessing
    return model
