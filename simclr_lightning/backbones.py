"""Encoders: torchvision ResNets (with the CIFAR stem SimCLR uses for 32x32 images), or any timm
model through ``timm:<name>``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision import models

from simclr_lightning.errors import SettingError, require

RESNETS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}
TIMM_PREFIX = "timm:"


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def build_backbone(
    name: str = "resnet18",
    cifar_stem: bool = False,
    in_channels: int = 3,
    zero_init_residual: bool = True,
    timm_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, int]:
    """A randomly initialised encoder that outputs features, and their width.

    ``resnet18/34/50`` are torchvision's, with ``fc`` the identity so the state dict loads into
    ``torchvision.models.<name>()`` unchanged (after the same stem edits). ``zero_init_residual``
    zero-initialises the last BatchNorm of every residual block, as google-research/simclr's
    ResNet does (``init_zero=True``), so each block starts as the identity.

    ``timm:<name>`` is ``timm.create_model(name, num_classes=0, in_chans=in_channels,
    **timm_kwargs)`` (e.g. ``{"img_size": 32}`` for a ViT on CIFAR): the model keeps its own stem
    and initialisation (timm's ResNets zero-initialise the last BN of a block by default).
    """
    require(in_channels >= 1, "model.in_channels", in_channels, ">= 1")
    if is_timm(name):
        return _timm_backbone(name, cifar_stem, in_channels, timm_kwargs or {})
    require(
        name in RESNETS,
        "model.backbone",
        name,
        f"one of {', '.join(sorted(RESNETS))} or timm:<model name>",
    )
    require(not timm_kwargs, "model.timm_kwargs", timm_kwargs, "empty for torchvision backbones")
    net = RESNETS[name](weights=None, zero_init_residual=zero_init_residual)
    apply_stem(net, cifar_stem=cifar_stem, in_channels=in_channels)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_resnet(
    name: str = "resnet18", cifar_stem: bool = False, in_channels: int = 3
) -> tuple[models.ResNet, int]:
    """0.1's builder (no zero-init of residual BatchNorms): kept for existing callers."""
    return build_backbone(name, cifar_stem, in_channels, zero_init_residual=False)


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


def _timm_backbone(
    name: str, cifar_stem: bool, in_channels: int, kwargs: dict[str, Any]
) -> tuple[nn.Module, int]:
    model_name = name.removeprefix(TIMM_PREFIX)
    require(
        not cifar_stem,
        "model.cifar_stem",
        cifar_stem,
        f"false for {name}: the CIFAR stem is a torchvision-ResNet edit; a timm model keeps "
        f"its own stem (pick one made for small images, or pass model.timm_kwargs)",
    )
    try:
        import timm
    except ImportError as err:
        raise SettingError(
            f"model.backbone={name!r} needs timm: pip install 'simclr-lightning[timm]'"
        ) from err
    try:
        net = timm.create_model(
            model_name, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs
        )
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise SettingError(f"model.backbone={name!r} is not a timm model: {err}") from err
    # with num_classes=0 a model with a pre-logits layer (MobileNetV3, GhostNet, LCNet, HGNet)
    # outputs head_hidden_size features, not num_features
    return net, int(getattr(net, "head_hidden_size", None) or net.num_features)
