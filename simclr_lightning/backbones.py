"""ResNet encoders built from torchvision, with the CIFAR stem SimCLR uses for 32x32 images."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models

from simclr_lightning.errors import require

RESNETS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}


def build_resnet(
    name: str = "resnet18", cifar_stem: bool = False, in_channels: int = 3
) -> tuple[models.ResNet, int]:
    """A randomly initialised torchvision ResNet whose ``fc`` is the identity.

    Keeping torchvision's module names means the encoder's state dict loads into
    ``torchvision.models.<name>()`` unchanged (after the same stem edits).
    Returns the network and the width of the features it outputs.
    """
    require(name in RESNETS, "model.backbone", name, f"one of {', '.join(sorted(RESNETS))}")
    require(in_channels >= 1, "model.in_channels", in_channels, ">= 1")
    net = RESNETS[name](weights=None)
    apply_stem(net, cifar_stem=cifar_stem, in_channels=in_channels)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def apply_stem(net: models.ResNet, cifar_stem: bool, in_channels: int = 3) -> models.ResNet:
    """Swap the first convolution for a 3x3 stride-1 one without max-pool (CIFAR stem) and/or
    for ``in_channels`` inputs; also what a user applies to load an exported encoder."""
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if cifar_stem or in_channels != 3:
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net
