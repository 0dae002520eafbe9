"""The ensemble *model*: several networks averaged into one (built by `chestxray ensemble`,
see `chestxray.training.ensemble`).

The ensemble's probability is the mean of its members' sigmoid outputs; its network
returns the logit of that mean, so everything that takes a bundle (predict, evaluate,
report, serve, ONNX export) takes an ensemble unchanged. Its thresholds are tuned anew,
per class F1-optimal, on a split none of the members trained on (by default the
validation split they share). Grad-CAM is not defined for an ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from chestxray.data.transforms import Preprocessing
from chestxray.errors import ChestXrayError

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
