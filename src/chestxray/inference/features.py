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


def pooled_features(model: Any, batch: Any) -> tuple[Any, Any]:
    """(logits, features) of a (N, 1, S, S) float32 numpy batch, as float32 numpy arrays."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode(), capture_head_input(model) as store:
        logits = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
    return logits.float().cpu().numpy(), store["features"].float().cpu().numpy()
