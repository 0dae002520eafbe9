"""`train --init BUNDLE`: start from a bundle's weights (an imported model or a previous run).

The body is copied as is. The output layer is remapped by finding name: rows of findings the
new label set shares with the bundle are kept, findings new to it get the freshly initialised
rows of a new head, findings the new set lacks are dropped; the log says which. The bundle's
preprocessing (scaling, channels, crop) is kept; only the input size may be overridden.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chestxray.errors import ChestXrayError
from chestxray.models.build import build_from_meta
from chestxray.models.bundle import load_bundle, read_bundle_meta
from chestxray.models.registry import ChestClassifier, _get_module, apply_freeze, get_spec

log = logging.getLogger(__name__)


def config_for_init(cfg: Any) -> Any:
    """A TrainConfig with `init` set, completed from the bundle: its architecture, and its input
    size unless the config gives one. The bundle's weights replace `weights`."""
    meta = read_bundle_meta(cfg.init)
    if meta.architecture == "ensemble":
        raise ChestXrayError(
            f"init={str(cfg.init)!r}: an ensemble bundle cannot be fine-tuned; pass one of its members"
        )
    size = cfg.image_size if cfg.image_size is not None else meta.preprocessing.size
    return dataclasses.replace(cfg, model=meta.architecture, image_size=size)


@dataclass
class HeadRemap:
    kept: list[str]
    new: list[str]
    dropped: list[str]

    def describe(self) -> str:
        return (
            f"output rows kept {len(self.kept)} ({', '.join(self.kept) or '-'}); "
            f"new {len(self.new)} ({', '.join(self.new) or '-'}); dropped {len(self.dropped)} "
            f"({', '.join(self.dropped) or '-'})"
        )


def init_from_bundle(
    path: str | os.PathLike, labels: Sequence[str], *, freeze: str = "seed", image_size: int | None = None
) -> tuple[ChestClassifier, HeadRemap, str]:
    """(model for `labels`, what happened to the output rows, the bundle's architecture).
    Fresh rows come from the caller's RNG state (seed it for a reproducible run)."""
    source, meta = load_bundle(path)
    if meta.architecture == "ensemble" or not isinstance(source, ChestClassifier):
        raise ChestXrayError(f"init={str(path)!r}: an ensemble bundle cannot be fine-tuned; pass one of its members")
    pre = meta.preprocessing if image_size is None else dataclasses.replace(meta.preprocessing, size=image_size)
    model = build_from_meta(meta.architecture, len(labels), pre)
    assert isinstance(model, ChestClassifier)  # build_from_meta gives one for a non-ensemble
    head_name = get_spec(meta.architecture).head
    old_head, new_head = _get_module(source.backbone, head_name), _get_module(model.backbone, head_name)
    if not isinstance(old_head, nn.Linear) or not isinstance(new_head, nn.Linear):
        raise ChestXrayError(f"init={str(path)!r}: the output layer of {meta.architecture} is not a linear layer")
    body = {k: v for k, v in source.backbone.state_dict().items() if not k.startswith(head_name + ".")}
    result = model.backbone.load_state_dict(body, strict=False)
    if result.unexpected_keys or any(not k.startswith(head_name + ".") for k in result.missing_keys):
        raise ChestXrayError(f"init={str(path)!r}: weights do not fit {meta.architecture}")  # pragma: no cover
    old_index = {lab: i for i, lab in enumerate(meta.labels)}
    remap = HeadRemap(
        kept=[lab for lab in labels if lab in old_index],
        new=[lab for lab in labels if lab not in old_index],
        dropped=[lab for lab in meta.labels if lab not in set(labels)],
    )
    with torch.no_grad():
        for row, lab in enumerate(labels):
            if lab in old_index:
                new_head.weight[row] = old_head.weight[old_index[lab]]
                new_head.bias[row] = old_head.bias[old_index[lab]]
    apply_freeze(model, freeze)
    return model, remap, meta.architecture
