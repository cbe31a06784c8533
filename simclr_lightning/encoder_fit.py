"""Whether encoder weights are those of a given architecture, told from names and shapes alone
(networks built on the meta device: no memory, no initialisation): what a plain state dict's
shapes say it is, and where a checkpoint's weights are not the network its settings record (a
backbone a user replaced in a SimCLR subclass)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from simclr_lightning.backbones import RESNETS, build_backbone
from simclr_lightning.errors import SettingError


def state_differences(own: dict[str, Any], state: dict[str, Tensor]) -> list[str]:
    """How ``state`` differs from an encoder whose state dict is ``own``: its first resized
    tensor, then how many keys are missing and unexpected, each with an example."""
    resized = [k for k in state if k in own and state[k].shape != own[k].shape]
    found = [f"{k} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the encoder"
             for k in resized[:1]]  # fmt: skip
    for what, keys in (("missing", [k for k in own if k not in state]),
                       ("unexpected", [k for k in state if k not in own])):  # fmt: skip
        found += [f"{len(keys)} keys {what}, e.g. {keys[0]!r}"] if keys else []
    return found


def _meta_state(name: str, cifar_stem: bool, in_channels: int, timm_kwargs: Any = None) -> dict:
    with torch.device("meta"):  # the shapes alone, no memory or initialisation
        net, _ = build_backbone(name, cifar_stem, in_channels, timm_kwargs=timm_kwargs)
    return net.state_dict()


def infer_arch(state: dict[str, Tensor]) -> dict[str, Any] | None:
    """The torchvision ResNet (``RESNETS``) and stem whose encoder state dict ``state`` is, from
    its names and shapes (the ``fc.*`` of a classifier or exported head aside): the 3x3 first
    convolution is the CIFAR stem, its input channels ``in_channels``. None where no such
    network has exactly these tensors (a timm model, another network)."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        return None
    shapes = {k: v.shape for k, v in state.items() if not k.startswith("fc.")}
    arch = {"cifar_stem": conv1.shape[-1] == 3, "in_channels": conv1.shape[1], "timm_kwargs": None}
    for name in RESNETS:
        own = _meta_state(name, arch["cifar_stem"], arch["in_channels"])
        if {k: v.shape for k, v in own.items()} == shapes:
            return {"backbone": name, **arch}
    return None


def recorded_mismatch(state: dict[str, Tensor], arch: dict[str, Any]) -> str | None:
    """Why the encoder ``state`` is not the network ``arch`` (a checkpoint's recorded
    ``backbone``, ``cifar_stem``, ``in_channels``, ``timm_kwargs``) builds, or None when it is,
    or when that network cannot be built here (timm not installed)."""
    try:
        own = _meta_state(arch["backbone"], arch.get("cifar_stem", False),
                          arch.get("in_channels", 3), arch.get("timm_kwargs"))  # fmt: skip
    except SettingError:  # timm missing: the file's tensors are written as they are
        return None
    found = state_differences(own, state)
    return "; ".join(found) if found else None
