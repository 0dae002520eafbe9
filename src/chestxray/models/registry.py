"""Models by name (a small registry, as timm does), weights policy and freezing policy.

Every network built here takes the eval preset's output, gray (N, 1, S, S) in [0, 1], and
carries its own input normalisation (`InputNormalize`), so training, prediction, the server
and ONNX export share one definition of preprocessing.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chestxray.data.transforms import Preprocessing
from chestxray.errors import ChestXrayError, WeightsUnavailableError
from chestxray.labels import FINDINGS

log = logging.getLogger(__name__)

FREEZE_POLICIES = ("seed", "all", "head")


class InputNormalize(nn.Module):
    """gray [0, 1] (N, 1, H, W) -> C channels (3: gray copied; 1: as is) normalised with the
    backbone's mean/std (one value per channel)."""

    mean: torch.Tensor  # buffers, typed for the checker (register_buffer is untyped)
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        c = len(mean)
        self.channels = c
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class ChestClassifier(nn.Module):
    """InputNormalize + a backbone whose final layer gives one logit per finding."""

    def __init__(self, backbone: nn.Module, preprocessing: Preprocessing, architecture: str) -> None:
        super().__init__()
        self.normalize = InputNormalize(preprocessing.mean, preprocessing.std)
        self.backbone = backbone
        self.preprocessing = preprocessing
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int, object], nn.Module]  # (num_classes, torchvision weights enum or None)
    imagenet_weights: Callable[[], object]  # the torchvision weights enum to download
    head: str  # attribute path of the final layer
    seed_trainable: tuple[str, ...]  # what the seed recipe trains besides the head
    cam_layer: str  # the last convolutional block, for Grad-CAM
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    # Builds with pretrained weights and the right head in one go (timm); None: torchvision.
    pretrained_build: Callable[[int], nn.Module] | None = None


_REGISTRY: dict[str, ModelSpec] = {}
_PREFIXES: dict[str, Callable[[str], ModelSpec]] = {}
# Families register themselves when imported; the registry imports them by name only,
# the first time a model is looked up, so it depends on none of them.
FAMILY_MODULES = ("chestxray.models.torchvision_models", "chestxray.models.timm", "chestxray.models.xrv")


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make `spec` available by its name (`create_model(spec.name)`)."""
    _REGISTRY[spec.name] = spec
    return spec


def register_prefix(prefix: str, resolve: Callable[[str], ModelSpec]) -> None:
    """Names starting with `prefix` (e.g. "timm/") are resolved by `resolve(name)`."""
    _PREFIXES[prefix] = resolve


def _load_families() -> None:
    import importlib

    for module in FAMILY_MODULES:
        importlib.import_module(module)


def registered_models() -> dict[str, ModelSpec]:
    _load_families()
    return dict(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _load_families()
    for prefix, resolve in _PREFIXES.items():
        if name.startswith(prefix):
            return resolve(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        prefixes = ", ".join(f"{p}<name>" for p in _PREFIXES)
        raise ChestXrayError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}"
            + (f", or {prefixes}" if prefixes else "")
        ) from None


def create_model(
    name: str = "resnet50",
    *,
    num_classes: int = len(FINDINGS),
    weights: str = "imagenet",
    freeze: str = "seed",
    image_size: int | None = None,
) -> ChestClassifier:
    """Build a classifier.

    weights: "imagenet" (torchvision download, cached in TORCH_HOME), "none" (random init),
    or a path to a .safetensors / .pth state dict of the backbone. Never falls back silently.
    freeze: "seed" (train layer2-layer4 + head), "all" (train everything), "head" (head only).
    """
    spec = get_spec(name)
    pre = spec.preprocessing
    if image_size is not None:
        pre = dataclasses.replace(pre, size=image_size)
    if weights == "imagenet":
        backbone = _with_imagenet(spec, num_classes)
    elif weights == "none":
        backbone = spec.build(num_classes, None)
    else:
        backbone = spec.build(num_classes, None)
        _load_backbone_file(backbone, Path(weights), spec)
    model = ChestClassifier(backbone, pre, spec.name)
    apply_freeze(model, freeze)
    return model


def _with_imagenet(spec: ModelSpec, num_classes: int) -> nn.Module:
    if spec.pretrained_build is not None:
        return spec.pretrained_build(num_classes)
    enum = spec.imagenet_weights()
    try:
        # torchvision builds the 1000-class net with the weights, then we swap the head.
        backbone = spec.build(1000, enum)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; offline hub raises these
        url = getattr(enum, "url", "?")
        raise WeightsUnavailableError(
            f"cannot get ImageNet weights for {spec.name} ({type(exc).__name__}: {exc}). "
            f"They download from {url} into $TORCH_HOME. Offline, pass weights='none' "
            "(random initialisation) or weights=FILE (a local .pth or .safetensors state dict)."
        ) from None
    _set_module(backbone, spec.head, nn.Linear(_head(backbone, spec).in_features, num_classes))
    return backbone


def _load_backbone_file(backbone: nn.Module, path: Path, spec: ModelSpec) -> None:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights={str(path)!r}: no such file; use 'imagenet', 'none' or a path to a state dict"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            # weights_only: a state dict of tensors, never arbitrary pickled objects. Its warnings
            # (e.g. about a foreign pickle protocol) would only precede the one-line error below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception:
        # torch's own message advises weights_only=False, which would run code from the file.
        raise WeightsUnavailableError(
            f"weights={str(path)!r}: not a state dict (.pth of tensors or .safetensors) that can be read safely"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise WeightsUnavailableError(f"weights={str(path)!r}: not a state dict (a mapping of names to tensors)")
    head_prefix = spec.head + "."
    head_shape = _head(backbone, spec).weight.shape
    state = {k: v for k, v in state.items() if not (k.startswith(head_prefix) and v.shape[0] != head_shape[0])}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches; torch lists every one
        raise WeightsUnavailableError(
            f"weights={str(path)!r}: not a {spec.name} state dict ({str(exc).splitlines()[-1].strip()[:200]})"
        ) from None
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"weights={str(path)!r}: not a {spec.name} state dict (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})"
        )


def _get_module(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def _head(backbone: nn.Module, spec: ModelSpec) -> nn.Linear:
    head = _get_module(backbone, spec.head)
    if not isinstance(head, nn.Linear):  # every registered family ends in one linear layer
        raise WeightsUnavailableError(f"{spec.name}: {spec.head} is a {type(head).__name__}, not a linear head")
    return head


def _set_module(root: nn.Module, dotted: str, value: nn.Module) -> None:
    *parents, last = dotted.split(".")
    setattr(_get_module(root, ".".join(parents)) if parents else root, last, value)


def apply_freeze(model: ChestClassifier, policy: str) -> None:
    """Set requires_grad by policy; frozen BatchNorm layers are kept in eval mode by
    `train_mode` so their running statistics stay put too."""
    if policy not in FREEZE_POLICIES:
        raise ChestXrayError(f"unknown freezing policy {policy!r}; choose one of {', '.join(FREEZE_POLICIES)}")
    spec = get_spec(model.architecture)
    if policy == "all":
        trainable: tuple[str, ...] = ("",)
    elif policy == "head":
        trainable = (spec.head,)
    else:
        trainable = (*spec.seed_trainable, spec.head)
    for pname, param in model.backbone.named_parameters():
        param.requires_grad = any(pname == t or pname.startswith(t + ".") or t == "" for t in trainable)
    model.freeze_policy = policy  # type: ignore[assignment]


def train_mode(model: nn.Module) -> None:
    """model.train(), but BatchNorm layers with frozen parameters stay in eval mode."""
    model.train()
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            params = list(mod.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                mod.eval()


def cam_target_layer(model: ChestClassifier) -> nn.Module:
    """The layer Grad-CAM hooks (last convolutional block of the backbone)."""
    if getattr(model, "architecture", None) == "ensemble":
        raise ChestXrayError("Grad-CAM is not defined for an ensemble; explain one of its member bundles")
    return _get_module(model.backbone, get_spec(model.architecture).cam_layer)
