"""torchxrayvision's architectures, registered by name.

`xrv-densenet121`: their DenseNet-121 (torchvision's layout and layer names, one input channel,
18 outputs in their release files); `xrv-resnet50`: torchvision's ResNet-50 with a one-channel
`conv1`. Both take their scaling, (x / 255) * 2048 - 1024 on one channel, as the bundle's mean
0.5 / std 1/2048 inside the network, after a centre crop to square and their resize
(scikit-image's, `chestxray.data.transforms.xrv_resize`) in the eval preset.
`chestxray import xrv NAME` (chestxray.models.xrv_import) turns their weights into bundles of
these architectures; training one from ImageNet weights is not possible (there are none).
The table of their weights is `chestxray.models.xrv_weights`.
"""

from __future__ import annotations

from torch import nn

from chestxray.errors import WeightsUnavailableError
from chestxray.models.registry import ModelSpec, register_model
from chestxray.models.xrv_weights import DENSENET, RESNET, xrv_preprocessing


def _densenet121_1ch(num_classes: int, weights: object) -> nn.Module:
    from torchvision.models import densenet121

    net = densenet121(weights=None)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    return net


def _resnet50_1ch(num_classes: int, weights: object) -> nn.Module:
    from torchvision.models import resnet50

    net = resnet50(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def _no_imagenet(name: str):
    def refuse(num_classes: int) -> nn.Module:
        raise WeightsUnavailableError(
            f"{name} has no ImageNet weights; make a bundle from torchxrayvision's weights with "
            "`chestxray import xrv` (models.xrv_import) and train from it with init=BUNDLE, or pass weights='none'"
        )

    return refuse


register_model(
    ModelSpec(
        DENSENET,
        _densenet121_1ch,
        lambda: None,
        "classifier",
        # seed: the last two dense blocks (with the transition between) and the final norm + head,
        # as for torchvision's densenet121; head: the classifier; all: everything.
        ("features.denseblock3", "features.transition3", "features.denseblock4", "features.norm5"),
        "features.norm5",
        xrv_preprocessing(224),
        pretrained_build=_no_imagenet(DENSENET),
    )
)
register_model(
    ModelSpec(
        RESNET,
        _resnet50_1ch,
        lambda: None,
        "fc",
        ("layer2", "layer3", "layer4"),
        "layer4",
        xrv_preprocessing(512),
        pretrained_build=_no_imagenet(RESNET),
    )
)
