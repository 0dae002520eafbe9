"""Test instruments shared by the Grad-CAM, localization and report tests.

`brightness_analyzer()` builds a real Analyzer around a hand-set network whose answer
is known: the target layer ("layer4", as for resnet18) averages the normalised input
over 8 x 8 cells and every logit is a positive multiple of the mean of that map. So the
gradient is the same positive number on every cell and the Grad-CAM of any finding is
ReLU(cell brightness): bright regions light up, dark ones stay 0. This lets tests check
the geometry of the maps (size, aspect, no shift, no flip) with a known answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from chestxray.data.transforms import Preprocessing
from chestxray.inference.predict import Analyzer, TorchBackend
from chestxray.labels import FINDINGS
from chestxray.models.registry import ChestClassifier

SIZE = 64  # model input side; the CAM grid is SIZE / 8 = 8 cells a side


class BrightnessBackbone(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.layer4 = nn.Conv2d(3, 1, kernel_size=8, stride=8, bias=False)
        with torch.no_grad():
            self.layer4.weight.fill_(1.0 / (3 * 8 * 8))
        self.register_buffer("scale", torch.linspace(0.5, 2.0, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.layer4(x)  # (N, 1, 8, 8): mean normalised brightness per cell
        return cells.mean(dim=(1, 2, 3))[:, None] * self.scale


def brightness_analyzer(thresholds: Iterable[float] | None = None) -> Analyzer:
    pre = Preprocessing(size=SIZE)
    model = ChestClassifier(BrightnessBackbone(len(FINDINGS)), pre, "resnet18").eval()
    thr = list(thresholds) if thresholds is not None else [0.5] * len(FINDINGS)
    return Analyzer(TorchBackend(model), FINDINGS, thr, pre, "brightness-test-model")


def all_hooks(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, hook kind) of every hook left on any module."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [(name, kind) for name, mod in model.named_modules() for kind in kinds if getattr(mod, kind)]


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_root(
    root: Path, images: Mapping[str, np.ndarray | os.PathLike], labels: Mapping[str, str], test: Iterable[str]
) -> Path:
    """A small dataset root in the NIH layout: images/, Data_Entry_2017.csv, split lists.
    `images` maps a file name to an array or to a file to copy; names not in `test` go
    to train_val."""
    test = set(test)
    for name, src in images.items():
        if isinstance(src, np.ndarray):
            write_png(root / "images" / name, src)
        else:
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "images" / name).write_bytes(Path(src).read_bytes())
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"]
    for i, name in enumerate(images):
        rows.append(f"{name},{labels[name]},0,{i + 1},50,F,PA")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (root / "test_list.txt").write_text("".join(f"{n}\n" for n in images if n in test))
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in images if n not in test))
    return root


def export_without_cam(bundle: Path, out: Path) -> Path:
    """Export `bundle` to ONNX as older versions did (and DenseNets do): no class activation
    map output."""
    import chestxray.export.onnx as ox

    real = ox.cam_equivalent_layer
    try:
        ox.cam_equivalent_layer = lambda model, size: None
        ox.export_bundle(bundle, out)
    finally:
        ox.cam_equivalent_layer = real
    return out
