"""What this library reads from and writes to checkpoints beyond Lightning's own: the class path
LightningCLI needs, the encoder inside a checkpoint, and its export as a plain torchvision
state dict (no Lightning, no projection head, no optimizer state):

    simclr-lightning-export last.ckpt resnet18_simclr.pt
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor


def with_class_path(module: L.LightningModule, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyperparameters with ``_class_path`` set (a copy; empty stays empty).

    LightningCLI parses saved hyperparameters against ``--model``; its own runs record the
    class path, models built in Python do not, and that parsing then fails.
    """
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if hparams:
        hparams.setdefault("_class_path", f"{type(module).__module__}.{type(module).__qualname__}")
    return hparams


def load_backbone_state(path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The encoder weights (torchvision names) and architecture hparams in ``path``: a SimCLR or
    LinearEval Lightning checkpoint, or a plain state dict written by ``export_backbone``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        state = {
            k.removeprefix("backbone."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("backbone.")
        }
        hparams = dict(ckpt.get("hyper_parameters") or {})
    else:
        state, hparams = dict(ckpt), {}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" not in state:
        raise ValueError(
            f"{path} holds no ResNet encoder: expected a SimCLR/LinearEval checkpoint (keys "
            f"backbone.*) or a torchvision state dict (conv1.weight ...)"
        )
    arch = {k: hparams[k] for k in ("backbone", "cifar_stem", "in_channels") if k in hparams}
    return state, arch


def export_backbone(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike) -> dict:
    """Write the encoder of a SimCLR (or LinearEval) checkpoint to ``output_path``.

    The file is a state dict with torchvision's names, without ``fc``:
    ``torchvision.models.<backbone>()`` (after ``apply_stem(net, cifar_stem, in_channels)``
    when those were used) loads it with ``load_state_dict(sd, strict=False)`` reporting only
    ``fc.weight``/``fc.bias`` missing. Written to a temporary file then renamed, so a crash
    never leaves a truncated file at ``output_path``. Returns the architecture to rebuild:
    ``{"backbone", "cifar_stem", "in_channels"}``.
    """
    state, arch = load_backbone_state(str(checkpoint_path))
    arch = {"backbone": "resnet18", "cifar_stem": False, "in_channels": 3, **arch}
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    _atomic_save(state, Path(output_path))
    return arch


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="simclr-lightning-export",
        description="Write a checkpoint's encoder as a torchvision ResNet state dict.",
    )
    parser.add_argument("checkpoint", help="SimCLR or LinearEval checkpoint (.ckpt)")
    parser.add_argument("output", help="where to write the state dict (.pt)")
    args = parser.parse_args(argv)
    arch = export_backbone(args.checkpoint, args.output)
    stem = ""
    if arch["cifar_stem"] or arch["in_channels"] != 3:
        stem = (
            f"\n    apply_stem(net, cifar_stem={arch['cifar_stem']}, "
            f"in_channels={arch['in_channels']})  # from simclr_lightning import apply_stem"
        )
    print(
        f"wrote {args.output}; load it with:\n"
        f"    net = torchvision.models.{arch['backbone']}(){stem}\n"
        f"    net.load_state_dict(torch.load({str(args.output)!r}), strict=False)"
        f"  # only fc is missing"
    )


if __name__ == "__main__":
    main()
