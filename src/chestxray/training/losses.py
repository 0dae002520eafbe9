"""Masked binary cross-entropy: unknown labels (NaN) contribute nothing to the loss."""

from __future__ import annotations

import torch
from torch import nn


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """BCE-with-logits over the known entries of `targets` (NaN = unknown). 'mean' divides by
    the number of known entries, so with no NaN it equals nn.BCEWithLogitsLoss; the logit of
    an unknown entry gets exactly zero gradient and its target value is never read."""
    known = ~torch.isnan(targets)
    safe = torch.where(known, targets, torch.zeros_like(targets))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, safe, pos_weight=pos_weight, reduction="none")
    loss = torch.where(known, loss, torch.zeros_like(loss))  # where, not multiply: no NaN*0 in the graph
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    return loss.sum() / known.sum().clamp(min=1)


class MaskedBCEWithLogitsLoss(nn.Module):
    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_bce_with_logits(logits, targets, self.pos_weight)
