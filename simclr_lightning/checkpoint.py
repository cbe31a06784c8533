"""What this library reads from and writes to checkpoints beyond Lightning's own: the class path
LightningCLI needs, the encoder and projection head inside a checkpoint, and their export as a
plain state dict (no Lightning, no optimizer state) with the command in
:mod:`simclr_lightning.export_cli`:

    simclr-lightning-export last.ckpt resnet18_simclr.pt [--head-layers 1]
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor, nn

from simclr_lightning.backbones import is_timm
from simclr_lightning.checkpoint_io import atomic_save, describe, local_path, read_checkpoint
from simclr_lightning.encoder_fit import infer_arch, recorded_mismatch, state_differences
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
    setting: str = SETTING  # the setting that gave the file, for errors


Source = str | os.PathLike | LoadedCheckpoint


def load_checkpoint(source: Source, setting: str = SETTING) -> LoadedCheckpoint:
    """``source`` read (CPU tensors, ``weights_only``), or as it is when already read."""
    if isinstance(source, LoadedCheckpoint):
        return source
    content = read_checkpoint(source, setting, map_location="cpu", weights_only=True)
    return LoadedCheckpoint(str(source), content, setting)


# Where plain-PyTorch training scripts keep the state dict: {"model": model.state_dict(), ...}
WRAPPERS = ("model", "model_state_dict", "module", "net", "network")


def _is_state(content: Any) -> bool:
    return isinstance(content, dict) and all(isinstance(v, Tensor) for v in content.values())


def _read(source: Source, setting: str = SETTING) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A checkpoint's state dict and hyperparameters (a plain state dict has none): Lightning's
    ``state_dict``, a state dict of tensors, or one under a single key of :data:`WRAPPERS`.
    Anything else (a dict of other things, a list) is a :class:`CheckpointError` naming what
    the file holds."""
    loaded = load_checkpoint(source, setting)
    ckpt, hparams = loaded.content, {}
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt, hparams = ckpt["state_dict"], dict(ckpt.get("hyper_parameters") or {})
    elif isinstance(ckpt, dict) and not _is_state(ckpt):
        inner = [k for k in WRAPPERS if _is_state(ckpt.get(k))]
        ckpt = ckpt[inner[0]] if len(inner) == 1 else ckpt
    if not _is_state(ckpt):
        raise CheckpointError(
            loaded.setting,
            loaded.path,
            f"holds {describe(loaded.content)}, not a state dict of tensors: expected a "
            f"SimCLR/LinearEval checkpoint or a state dict (name -> tensor, as "
            f"simclr-lightning-export writes), at the top level or under 'state_dict' or "
            f"'model'",
        )
    return dict(ckpt), hparams


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
    setting = path.setting
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
    ``output_path``. The pretraining preprocessing the checkpoint records (image size,
    normalisation) goes to :func:`preprocessing_path` as JSON, the same way (a stale one of an
    earlier export is removed); the state dict itself stays plain. ``setting`` names
    ``head_layers`` in errors (the command passes ``--head-layers``). Returns the architecture
    to rebuild (``backbone``, ``cifar_stem``, ``in_channels``, ``timm_kwargs``, ``head_layers``,
    ``fc``, ``inferred``: read from the shapes of a file that records none, :func:`infer_arch`;
    ``backbone`` None where they tell nothing) and the ``preprocessing`` (None if unrecorded).
    """
    from simclr_lightning.export_cli import refuse_same_file, sequential_code  # imports this

    require(head_layers >= 0, setting, head_layers, ">= 0")
    refuse_same_file(checkpoint_path, output_path)
    checkpoint = load_checkpoint(checkpoint_path, "checkpoint")
    state, arch = load_backbone_state(checkpoint, "checkpoint")
    inferred = infer_arch(state) if not arch else None
    mismatch = recorded_mismatch(state, arch) if arch.get("backbone") else None
    if mismatch:
        raise CheckpointError(
            "checkpoint", checkpoint_path,
            f"holds an encoder that is not the {arch['backbone']} its hyperparameters record "
            f"({mismatch}): a SimCLR subclass with its own backbone? Save that one with "
            "torch.save(model.backbone.state_dict(), path)",
        )  # fmt: skip
    unknown = {"backbone": None, "cifar_stem": False, "in_channels": 3, "timm_kwargs": None}
    arch = (inferred or unknown) | arch
    arch.update(head_layers=head_layers, fc=None, inferred=inferred is not None)
    if head_layers:
        layers, _ = projection_layers(checkpoint, head_layers, setting)
        state.update({f"fc.{k}": v for k, v in layers.state_dict().items()})
        arch["fc"] = sequential_code(layers)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    atomic_save(state, Path(output_path))
    arch["preprocessing"] = pretraining_record(checkpoint)["preprocessing"]
    sidecar = preprocessing_path(output_path)
    if arch["preprocessing"]:
        atomic_save(arch["preprocessing"], sidecar, _write_json)
    else:  # it described the file just replaced
        sidecar.unlink(missing_ok=True)
    return arch


def preprocessing_path(output_path: str | os.PathLike) -> Path:
    """Where :func:`export_backbone` writes the pretraining preprocessing of ``output_path``:
    ``<output_path>.preprocessing.json``."""
    return Path(local_path(f"{os.fspath(output_path)}.preprocessing.json"))


def _write_json(obj: Any, f: Any) -> None:
    f.write((json.dumps(obj, indent=2) + "\n").encode())


def unfit_problem(
    checkpoint: Source, encoder: nn.Module, state: dict[str, Tensor], arch: dict[str, Any]
) -> str:
    """Why the encoder ``state`` of ``checkpoint`` does not load into ``encoder``, built with
    ``arch``, in one line: its first difference and, for a plain state dict (which records no
    architecture), the settings to give, with those its shapes point to (:func:`infer_arch`)."""
    found = state_differences(encoder.state_dict(), state)
    built = f"cifar_stem={arch['cifar_stem']}, in_channels={arch['in_channels']}"
    if is_timm(arch["backbone"]):
        built = f"timm_kwargs={arch['timm_kwargs']}, in_channels={arch['in_channels']}"
    problem = f"does not fit a {arch['backbone']} encoder with {built} ({'; '.join(found)}): "
    hparams = _read(checkpoint)[1]
    recorded = {k: hparams[k] for k in ARCH_KEYS if k in hparams}
    if recorded.get("backbone") and recorded_mismatch(state, recorded):
        return problem + (
            f"its encoder is not the {recorded['backbone']} its hyperparameters record (a "
            "SimCLR subclass with its own backbone?): LinearEval builds --model.backbone "
            "encoders only (torchvision ResNets, timm:<name>)"
        )
    if hparams:  # a Lightning checkpoint, with its settings
        return problem + (
            "expected a SimCLR/LinearEval checkpoint or a state dict written by "
            "simclr-lightning-export"
        )
    guess = infer_arch(state)
    hint = (
        f" (its shapes are those of --model.backbone={guess['backbone']} "
        f"--model.cifar_stem={str(guess['cifar_stem']).lower()} "
        f"--model.in_channels={guess['in_channels']})"
        if guess
        else ""
    )
    return problem + (
        "a plain state dict (as simclr-lightning-export writes) does not record the "
        "architecture: give the pretraining run's --model.backbone, --model.cifar_stem, "
        f"--model.in_channels and --model.timm_kwargs{hint}"
    )


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


def __getattr__(name: str) -> Any:
    """The export command lived here before :mod:`simclr_lightning.export_cli`: ``from
    simclr_lightning.checkpoint import main`` (older console scripts) still finds it."""
    if name in ("main", "rebuild_code", "sequential_code", "EXPORT_PROG"):
        from simclr_lightning import export_cli

        return getattr(export_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
