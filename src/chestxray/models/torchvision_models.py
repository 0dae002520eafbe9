"""The torchvision families (ResNet-50, DenseNet-121, ResNet-18), registered by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from chestxray.models.registry import ModelSpec, register_model


def _resnet50(num_classes: int, weights: object) -> nn.Module:
    from torchvision.models import resnet50

    net = resnet50(weights=weights)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def _densenet121(num_classes: int, weights: object) -> nn.Module:
    from torchvision.models import densenet121

    net = densenet121(weights=weights)
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    return net


def _resnet18(num_classes: int, weights: object) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(weights=weights)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def _tv_weights(enum_name: str, member: str) -> Callable[[], object]:
    def get() -> object:
        import torchvision.models as tvm

        return getattr(getattr(tvm, enum_name), member)

    return get


register_model(
    ModelSpec(
        "resnet50",
        _resnet50,
        _tv_weights("ResNet50_Weights", "IMAGENET1K_V2"),
        "fc",
        ("layer2", "layer3", "layer4"),
        "layer4",
    )
)
register_model(
    ModelSpec(
        "densenet121",
        _densenet121,
        _tv_weights("DenseNet121_Weights", "IMAGENET1K_V1"),
        "classifier",
        ("features.denseblock3", "features.transition3", "features.denseblock4", "features.norm5"),
        "features.norm5",
    )
)
# Small and fast: for tests, CPUs and quick experiments.
register_model(
    ModelSpec(
        "resnet18",
        _resnet18,
        _tv_weights("ResNet18_Weights", "IMAGENET1K_V1"),
        "fc",
        ("layer2", "layer3", "layer4"),
        "layer4",
    )
)
