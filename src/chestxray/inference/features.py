"""The pooled features a classifier's final layer sees (its head input), by a forward pre-hook.

One helper for every consumer (the input check here; embeddings elsewhere), so the
features are taken in the same forward pass as the logits and never by re-implementing
a backbone's pooling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from chestxray.errors import ChestXrayError


def head_layer(model: Any) -> Any:
    """The final (classification) layer of a registry model."""
    from chestxray.models.registry import get_spec

    arch = getattr(model, "architecture", None)
    if arch is None or arch == "ensemble" or not hasattr(model, "backbone"):
        raise ChestXrayError(f"pooled features are defined for single registry models, not {arch or 'this model'}")
    return model.backbone.get_submodule(get_spec(arch).head)


@contextlib.contextmanager
def capture_head_input(model: Any) -> Iterator[dict[str, Any]]:
    """`with capture_head_input(model) as store: logits = model(x)`; then store["features"]
    is the (N, D) tensor fed to the final layer in that pass."""
    store: dict[str, Any] = {}

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        store["features"] = args[0].flatten(1)

    handle = head_layer(model).register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def pooled_features(model: Any, batch: Any, layers: list[str] | None = None) -> tuple[Any, Any]:
    """(logits, features) of a (N, 1, S, S) float32 numpy batch, as float32 numpy arrays:
    features is the head input (N, D), or with `layers` a dict {layer: (N, D)}."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode(), capture_features(model, layers or [HEAD]) as store:
        logits = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
    feats = {k: v.float().cpu().numpy() for k, v in store.items()}
    return logits.float().cpu().numpy(), (feats if layers is not None else feats[HEAD])


HEAD = "head"
# An early stage whose pooled output describes texture and contrast (where photographs, text
# and noise differ most from radiographs; Lee et al. 2018 score several layers the same way).
EARLY_STAGES = ("backbone.layer1", "backbone.features.denseblock1")


def input_check_layers(model: Any) -> list[str]:
    """The feature sets the input check scores: the head input, plus an early stage when
    the architecture has a known one."""
    names = {n for n, _ in model.named_modules()}
    return [HEAD] + [n for n in EARLY_STAGES if n in names][:1]


@contextlib.contextmanager
def capture_features(model: Any, layers: list[str]) -> Iterator[dict[str, Any]]:
    """Like capture_head_input, for several feature sets: "head" (the head input) and named
    modules, whose outputs are average-pooled over space to (N, C)."""
    store: dict[str, Any] = {}
    handles = []

    def head_hook(_m: Any, args: tuple[Any, ...]) -> None:
        store[HEAD] = args[0].flatten(1)

    try:
        for name in layers:
            if name == HEAD:
                handles.append(head_layer(model).register_forward_pre_hook(head_hook))
                continue

            def hook(_m: Any, _a: Any, out: Any, name: str = name) -> None:
                store[name] = out.float().mean(dim=(2, 3)) if out.dim() == 4 else out.flatten(1)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
