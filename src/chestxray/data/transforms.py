"""Preprocessing presets.

Eval (the one definition used by validation, prediction, the server and ONNX export):
  gray uint8 image -> antialiased bilinear resize to size x size (PIL) -> float32 in [0, 1],
  shape (1, size, size). Gray-to-3-channel and mean/std normalisation live inside the
  network (`chestxray.models.InputNormalize`), so an exported graph carries them too.
Train: batches of cached uint8 images augmented on the device (`BatchAugment`), so no
per-sample PIL work sits in the training loop. Each augmenter owns its torch.Generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from chestxray.errors import ChestXrayError

if TYPE_CHECKING:  # torch is optional for the light inference install
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects; stored in every bundle and ONNX file."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bilinear-antialias"
    input: str = "gray float32 in [0,1], shape (N, 1, size, size)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        try:
            size = int(d["size"])
            mean = tuple(float(v) for v in d["mean"])
            std = tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ChestXrayError(f"preprocessing: missing or bad field ({exc!r}) in {d!r}") from None
        if size < 8 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ChestXrayError(f"preprocessing: invalid values in {d!r}")
        return cls(size=size, mean=mean, std=std)


def resize_gray(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of a HxW uint8 image to size x size (aspect not kept,
    as NIH itself resized its originals to 1024 x 1024)."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ChestXrayError(f"resize_gray: expected a 2-D uint8 image, got shape {image.shape} dtype {image.dtype}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ChestXrayError(f"resize_gray: size must be a positive integer, got {size!r}")
    if min(image.shape) < 1:
        raise ChestXrayError(f"resize_gray: empty image of shape {image.shape}")
    if image.shape == (size, size):
        return image
    # PIL widens the filter support when shrinking, i.e. it antialiases.
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


@dataclass
class EvalPreset:
    """gray uint8 HxW -> float32 (1, size, size) in [0, 1]."""

    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        resized = resize_gray(image, self.preprocessing.size)
        return (resized.astype(np.float32) * (1.0 / 255.0))[None]

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        return (
            np.stack([self(im) for im in images])
            if images
            else np.zeros((0, 1, self.preprocessing.size, self.preprocessing.size), np.float32)
        )


@dataclass
class AugmentConfig:
    """Strengths of the train preset; 0 switches a part off."""

    rotation: float = 10.0  # degrees, uniform in [-r, r]
    scale: float = 0.0  # zoom in [1 - s, 1 + s]
    translate: float = 0.0  # shift as a fraction of the side
    hflip: float = 0.0  # probability
    brightness: float = 0.1  # additive, in [-b, b]
    contrast: float = 0.1  # factor in [1 - c, 1 + c]

    # Upper bounds that keep each part a plausible radiograph (and the maths defined).
    _LIMITS: ClassVar[dict[str, float]] = {
        "rotation": 180.0,
        "scale": 0.9,
        "translate": 1.0,
        "hflip": 1.0,
        "brightness": 1.0,
        "contrast": 1.0,
    }

    def __post_init__(self) -> None:
        for name, top in self._LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= top:
                raise ChestXrayError(f"AugmentConfig.{name}: expected a number in [0, {top:g}], got {value!r}")

    @property
    def is_identity(self) -> bool:
        """True when every part is switched off (the augmenter returns its input)."""
        return all(getattr(self, name) == 0 for name in self._LIMITS)

    @classmethod
    def preset(cls, name: str) -> "AugmentConfig | None":
        presets = {
            "none": None,
            # What the seed planned: small rotation, horizontal flip, brightness/contrast.
            "seed": cls(rotation=10.0, hflip=0.5, brightness=0.1, contrast=0.1),
            # For training from scratch on little data (the bundled model; see MODEL_CARD.md).
            "strong": cls(rotation=10.0, scale=0.1, translate=0.06, hflip=0.0, brightness=0.1, contrast=0.25),
        }
        if name not in presets:
            raise ChestXrayError(f"unknown augmentation preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name]


class BatchAugment:
    """Random affine (rotation, scale, shift), flip and brightness/contrast on a batch.

    Input: float tensor (N, 1, H, W) in [0, 1] on any device. Runs as a few batched
    kernels, so it keeps up with the GPU. Owns its generator; touches no global RNG.
    """

    def __init__(self, config: AugmentConfig, seed: int = 0, device: "str | torch.device" = "cpu") -> None:
        import torch

        self.config = config
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _uniform(self, n: int, lo: float, hi: float) -> "torch.Tensor":
        import torch

        return torch.rand(n, device=self.device, generator=self.generator) * (hi - lo) + lo

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        if x.ndim != 4 or x.shape[1] != 1 or not x.is_floating_point():
            raise ChestXrayError(f"BatchAugment: expected a float (N, 1, H, W) batch, got {tuple(x.shape)} {x.dtype}")
        if x.device != self.device and not (x.device.type == self.device.type == "cuda" and self.device.index is None):
            raise ChestXrayError(f"BatchAugment: batch is on {x.device} but the augmenter on {self.device}")
        c, n = self.config, x.shape[0]
        angle = self._uniform(n, -c.rotation, c.rotation) * (math.pi / 180.0)
        zoom = self._uniform(n, 1.0 - c.scale, 1.0 + c.scale)
        shift = self._uniform(2 * n, -c.translate, c.translate).view(n, 2) * 2.0
        flip = (self._uniform(n, 0.0, 1.0) < c.hflip).to(x.dtype) * -2.0 + 1.0
        if c.rotation or c.scale or c.translate or c.hflip:
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            theta = torch.stack(
                [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)],
                1,
            ).to(x.dtype)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if c.contrast or c.brightness:
            gain = self._uniform(n, 1.0 - c.contrast, 1.0 + c.contrast).view(n, 1, 1, 1).to(x.dtype)
            bias = self._uniform(n, -c.brightness, c.brightness).view(n, 1, 1, 1).to(x.dtype)
            mean = x.mean(dim=(2, 3), keepdim=True)
            x = ((x - mean) * gain + mean + bias).clamp_(0.0, 1.0)
        return x
