"""What this library reads from and writes to checkpoints beyond Lightning's own: the class path
LightningCLI needs, the encoder and projection head inside a checkpoint, and their export as a
plain state dict (no Lightning, no optimizer state):

    simclr-lightning-export last.ckpt resnet18_simclr.pt [--head-layers 1]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor, nn

from simclr_lightning.checkpoint_io import atomic_save, read_checkpoint
from simclr_lightning.errors import CheckpointError, require
from simclr_lightning.heads import ProjectionHead


def with_class_path(module: L.LightningModule, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyperparameters with ``_class_path`` set (a copy; empty stays empty).

    LightningCLI parses saved hyperparameters against ``--model``; its own runs record the
    class path, models built in Python do not, and that parsing then fails.
    """
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if hparams:
        hparams.setdefault("_class_path", f"{type(module).__module__}.{type(module).__qualname__}")
    return hparams


ARCH_KEYS = ("backbone", "cifar_stem", "in_channels", "timm_kwargs")


# The setting a user gives the checkpoint by, for error messages (the export tool passes its own).
SETTING = "model.checkpoint"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint file read once, for the functions here that each need a part of it: a
    large checkpoint (a ResNet-50's with its optimizer state) is then read from disk once per
    process, not once per part."""

    path: str
    content: Any


Source = str | os.PathLike | LoadedCheckpoint


def load_checkpoint(source: Source, setting: str = SETTING) -> LoadedCheckpoint:
    """``source`` read (CPU tensors, ``weights_only``), or as it is when already read."""
    if isinstance(source, LoadedCheckpoint):
        return source
    content = read_checkpoint(source, setting, map_location="cpu", weights_only=True)
    return LoadedCheckpoint(str(source), content)


def _read(source: Source, setting: str = SETTING) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A checkpoint's state dict and hyperparameters (a plain state dict has none)."""
    ckpt = load_checkpoint(source, setting).content
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        return dict(ckpt["state_dict"]), dict(ckpt.get("hyper_parameters") or {})
    return dict(ckpt), {}


def load_backbone_state(
    path: Source, setting: str = SETTING
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The encoder weights (the backbone's own names) and architecture hparams in ``path``: a
    SimCLR or LinearEval Lightning checkpoint, or a plain state dict written by
    ``export_backbone`` (whose ``fc.*`` projection layers, if any, are left out).

    In a module's state dict the encoder is exactly ``backbone.*``: the projection head and
    classifier are top-level ``head.*``/``projection.*``, while an encoder's own ``head.*``
    (timm's ConvNeXt, EdgeNeXt, DaViT... keep ``head.norm`` with ``num_classes=0``) is
    ``backbone.head.*``. So only a plain state dict of nothing but such names is refused here;
    whether the rest fits the encoder is for ``load_state_dict`` to say."""
    path = load_checkpoint(path, setting)
    state, hparams = _read(path)
    if hparams or any(k.startswith("backbone.") for k in state):
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    else:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        if all(k.startswith(("head.", "projection.")) for k in state):
            state = {}  # a projection head or classifier alone
    if not state:
        raise CheckpointError(
            setting,
            path.path,
            "holds no encoder: expected a SimCLR/LinearEval checkpoint (keys backbone.*) or a "
            "state dict written by simclr-lightning-export",
        )
    arch = {k: hparams[k] for k in ARCH_KEYS if k in hparams}
    return state, arch


def pretraining_record(checkpoint: Source | None) -> dict[str, Any]:
    """The file and the preprocessing (normalisation) of the data the encoder in
    ``checkpoint`` was pretrained on, as SimCLR checkpoints record it and LinearEval
    checkpoints keep it; the preprocessing is None for a plain state dict or a checkpoint
    from before the record, and the record empty without a checkpoint."""
    if checkpoint is None:
        return {}
    loaded = load_checkpoint(checkpoint)
    ckpt, record = loaded.content, None
    if isinstance(ckpt, dict):
        record = ckpt.get("pretraining") or (ckpt.get("linear_eval") or {}).get("pretraining")
    return {"checkpoint": loaded.path, "preprocessing": (record or {}).get("preprocessing")}


def load_projection_head(path: Source) -> ProjectionHead | None:
    """The pretrained projection head of a SimCLR checkpoint (``head.net.*``), rebuilt from the
    shapes of its weights so that 0.1's heads (no output BatchNorm) load too; None if the file
    holds no head."""
    state, _ = _read(path)
    head = {k.removeprefix("head.net."): v for k, v in state.items() if k.startswith("head.net.")}
    if not head:
        return None
    config, _ = head_config_of(head)
    projection = ProjectionHead(**config)
    projection.net.load_state_dict(head)
    return projection


def head_config_of(layers: dict[str, Tensor]) -> tuple[dict[str, Any], int]:
    """The ProjectionHead config whose first layers have the weights ``layers`` (keyed by the
    head's ``net`` indices), read from their shapes, and how many Linear layers they hold.
    The last of them is the output layer unless a BatchNorm with a shift follows it (the
    output BatchNorm has a scale only): then it is a hidden layer, the head one layer deeper,
    and its output width not in ``layers`` (the hidden width stands in)."""
    linears = sorted(int(n.split(".")[0]) for n, v in layers.items() if v.ndim == 2)
    first, last = layers[f"{linears[0]}.weight"], layers[f"{linears[-1]}.weight"]
    after = linears[-1] + 1
    hidden = f"{after}.bias" in layers
    config = dict(
        input_dim=first.shape[1],
        hidden_dim=first.shape[0],
        output_dim=last.shape[0],
        num_layers=len(linears) + hidden,
        output_bn=hidden or f"{after}.running_mean" in layers,
    )
    return config, len(linears)


def export_backbone(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike,
    head_layers: int = 0,
    setting: str = "head_layers",
) -> dict[str, Any]:
    """Write the encoder of a SimCLR (or LinearEval) checkpoint to ``output_path``.

    The file is a state dict with the backbone's own names: ``torchvision.models.<backbone>()``
    (after ``apply_stem(net, cifar_stem, in_channels)`` when those were used) or
    ``timm.create_model(name, num_classes=0, in_chans=in_channels, **timm_kwargs)`` loads it.
    With ``head_layers`` k > 0 it also holds the first k projection-head layers as ``fc.*`` (an
    ``nn.Sequential``, ``arch["fc"]`` spells it), the features SimCLR v2 fine-tunes from: set
    a torchvision ResNet's ``net.fc`` to that Sequential and it loads strictly (otherwise only
    its ``fc`` is missing); a timm encoder's forward may not call ``fc``, so load the ``fc.*``
    tensors into the Sequential and run ``nn.Sequential(net, head)`` (:func:`rebuild_code`).
    Written to a temporary file then renamed, so a crash never leaves a truncated file at
    ``output_path``. ``setting`` names ``head_layers`` in errors (the command passes
    ``--head-layers``). Returns the architecture to rebuild (``backbone``,
    ``cifar_stem``, ``in_channels``, ``timm_kwargs``, ``head_layers``, ``fc``).
    """
    require(head_layers >= 0, setting, head_layers, ">= 0")
    checkpoint = load_checkpoint(checkpoint_path, "checkpoint")
    state, arch = load_backbone_state(checkpoint, "checkpoint")
    defaults = {"backbone": "resnet18", "cifar_stem": False, "in_channels": 3, "timm_kwargs": None}
    arch = defaults | arch
    arch.update(head_layers=head_layers, fc=None)
    if head_layers:
        layers, _ = projection_layers(checkpoint, head_layers, setting)
        state.update({f"fc.{k}": v for k, v in layers.state_dict().items()})
        arch["fc"] = sequential_code(layers)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    atomic_save(state, Path(output_path))
    return arch


def projection_layers(
    path: Source, k: int, setting: str = "model.head_layers"
) -> tuple[nn.Sequential, dict[str, Any]]:
    """The first ``k`` pretrained projection-head layers in ``path`` and the config of the head
    they come from: a SimCLR checkpoint's head, or the layers a LinearEval checkpoint kept.
    ``setting`` is the name ``k`` is given by, for errors."""
    path = load_checkpoint(path)
    head = load_projection_head(path)
    if head is not None:
        require(k <= head.num_layers, setting, k, f"<= {head.num_layers}, the head's depth")
        return head.first_layers(k), head.config
    state, hparams = _read(path)
    # simclr-lightning-export --head-layers: fc.<index>.* (a torchvision classifier is fc.weight)
    exported = {n[3:]: v for n, v in state.items() if re.match(r"fc\.\d+\.", n)}
    if not hparams and exported:
        return exported_layers(path.path, exported, k, setting)
    kept = hparams.get("head_layers", 0)
    require(
        0 < k == kept,
        setting,
        k,
        f"0 for {path.path}: it holds no projection head"
        if not kept
        else f"{kept}, the layers it kept",
    )
    layers = ProjectionHead(**hparams["head_config"]).first_layers(k)
    layers.load_state_dict(
        {n.removeprefix("projection."): v for n, v in state.items() if n.startswith("projection.")}
    )
    return layers, hparams["head_config"]


def exported_layers(
    path: str | os.PathLike, fc: dict[str, Tensor], k: int, setting: str = "model.head_layers"
) -> tuple[nn.Sequential, dict[str, Any]]:
    """The head layers ``export_backbone`` wrote as ``fc.*``, and a head config that rebuilds
    them (:func:`head_config_of`)."""
    config, kept = head_config_of(fc)
    require(k == kept, setting, k, f"{kept}, the layers {path} holds")
    layers = ProjectionHead(**config).first_layers(k)
    layers.load_state_dict(fc)
    return layers, config


def sequential_code(layers: nn.Sequential) -> str:
    """Python that builds an empty ``layers`` (for a user with only torch and torchvision)."""
    parts = []
    for m in layers:
        if isinstance(m, nn.Linear):
            parts.append(f"nn.Linear({m.in_features}, {m.out_features}, bias={m.bias is not None})")
        elif isinstance(m, nn.BatchNorm1d) and m.bias is None:  # the official scale-only BN
            parts.append(f"ScaleBatchNorm1d({m.num_features})")
        elif isinstance(m, nn.BatchNorm1d):
            parts.append(f"nn.BatchNorm1d({m.num_features})")
        else:
            parts.append(f"nn.{type(m).__name__}()")
    return f"nn.Sequential({', '.join(parts)})"


EXPORT_PROG = "simclr-lightning-export"


def main(argv: list[str] | None = None) -> None:
    """``simclr-lightning-export``: an error a user can fix (a missing or truncated checkpoint,
    a bad ``--head-layers``) is one line on stderr and a non-zero exit, as for
    ``simclr-lightning`` (:mod:`simclr_lightning.cli_errors`; ``SIMCLR_DEBUG=1`` keeps the
    traceback)."""
    parser = argparse.ArgumentParser(
        prog=EXPORT_PROG,
        description="Write a checkpoint's encoder (and projection layers) as a plain state dict.",
    )
    parser.add_argument("checkpoint", help="SimCLR or LinearEval checkpoint (.ckpt)")
    parser.add_argument("output", help="where to write the state dict (.pt)")
    parser.add_argument(
        "--head-layers",
        type=int,
        default=0,
        help="also export the first k projection-head layers as fc (SimCLR v2 fine-tunes from 1)",
    )
    args = parser.parse_args(argv)
    from simclr_lightning.cli_errors import report  # lightning.pytorch.cli: only when run

    try:
        arch = export_backbone(args.checkpoint, args.output, args.head_layers, "--head-layers")
    except Exception as err:
        code = report(err, EXPORT_PROG)
        if code is None:
            raise
        sys.exit(code)
    print(f"wrote {args.output}; load it with:\n{rebuild_code(arch, str(args.output))}")


def rebuild_code(arch: dict[str, Any], output: str) -> str:
    """Python (indented 4) that builds the encoder ``export_backbone`` wrote to ``output`` and
    loads it: the timm model with the run's ``timm_kwargs`` (``img_size`` sets a ViT's position
    embedding, which the file's must match), or torchvision's."""
    strict = arch["fc"] or arch["backbone"].startswith("timm:")  # timm's has no fc to miss
    if arch["backbone"].startswith("timm:"):
        name = arch["backbone"].removeprefix("timm:")
        kwargs = "".join(f", {k}={v!r}" for k, v in (arch["timm_kwargs"] or {}).items())
        build = (
            f"net = timm.create_model({name!r}, num_classes=0, "
            f"in_chans={arch['in_channels']}{kwargs})"
        )
    else:
        build = f"net = torchvision.models.{arch['backbone']}()"
        if arch["cifar_stem"] or arch["in_channels"] != 3:
            build += (
                f"\n    apply_stem(net, cifar_stem={arch['cifar_stem']}, "
                f"in_channels={arch['in_channels']})  # from simclr_lightning import apply_stem"
            )
    load = ""
    scale = "  # ScaleBatchNorm1d: from simclr_lightning.heads"
    scale = scale if "Scale" in str(arch["fc"]) else ""
    if arch["fc"] and arch["backbone"].startswith("timm:"):  # its forward may not call fc
        return (
            f"    {build}\n    head = {arch['fc']}{scale}\n"
            f"    state = torch.load({output!r})\n"
            f"    head.load_state_dict({{k[3:]: state.pop(k) for k in list(state) "
            f"if k.startswith('fc.')}})\n"
            f"    net.load_state_dict(state)\n"
            f"    net = nn.Sequential(net, head)  # the encoder, then the first head layers"
        )
    if arch["fc"]:
        load = f"    net.fc = {arch['fc']}{scale}\n"
    if strict:
        load += f"    net.load_state_dict(torch.load({output!r}))"
    else:
        load += (
            f"    net.load_state_dict(torch.load({output!r}), strict=False)  # only fc is missing"
        )
    return f"    {build}\n{load}"


if __name__ == "__main__":
    main()
