"""Any timm model as a backbone: `--model timm/<name>` (e.g. timm/efficientnet_b0).

timm is optional (`pip install timm`). Its own pretrained config gives the head, the
input size and the normalisation, so a timm bundle carries the right preprocessing.
Pretrained weights come from timm's hub download; offline, that fails with a clear
message (never a silent fall back to random weights).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from torch import nn

from chestxray.data.transforms import Preprocessing
from chestxray.errors import ChestXrayError, WeightsUnavailableError
from chestxray.models.registry import ModelSpec, register_prefix

PREFIX = "timm/"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ChestXrayError("timm models need the timm package: pip install timm") from None
    return timm


@lru_cache(maxsize=32)
def timm_spec(name: str) -> ModelSpec:
    arch = name[len(PREFIX) :]
    timm = _timm()
    if not timm.is_model(arch):
        raise ChestXrayError(
            f'unknown timm model {arch!r}; `python -c "import timm; print(timm.list_models())"` lists them'
        )
    probe = timm.create_model(arch, pretrained=False, num_classes=1)
    cfg = probe.pretrained_cfg
    head = cfg.get("classifier", "fc")
    stages = [f["module"] for f in getattr(probe, "feature_info", [])]
    if not stages:
        raise ChestXrayError(f"timm model {arch!r} exposes no feature stages; Grad-CAM and freezing need them")
    # The seed policy, generalised: train the last three stages (and what follows them) + head.
    names = [n for n, _ in probe.named_parameters()]
    first = stages[-3] if len(stages) >= 3 else stages[0]
    start = next((i for i, n in enumerate(names) if n.startswith(first + ".")), 0)
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    pre = Preprocessing(
        size=size, mean=tuple(cfg.get("mean", Preprocessing.mean)), std=tuple(cfg.get("std", Preprocessing.std))
    )

    def build(num_classes: int, weights: object) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)

    def pretrained(num_classes: int) -> nn.Module:
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # hub errors come in many types (OSError, HTTP, offline mode)
            raise WeightsUnavailableError(
                f"cannot get pretrained weights for timm model {arch} ({type(exc).__name__}: {exc}). "
                "timm downloads them from its hub. Offline, pass weights='none' (random "
                "initialisation) or weights=FILE (a local state dict of this model)."
            ) from None

    return ModelSpec(
        name=name,
        build=build,
        imagenet_weights=lambda: None,
        head=head,
        seed_trainable=tuple(n for n in names[start:] if not n.startswith(head + ".")),
        cam_layer=stages[-1],
        preprocessing=pre,
        pretrained_build=pretrained,
    )


register_prefix(PREFIX, timm_spec)
