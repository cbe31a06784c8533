"""Export the pretrained encoder as a plain torchvision state dict: what downstream code loads,
with no Lightning, no projection head and no optimizer state.

    python -m simclr_lightning.export last.ckpt resnet18_simclr.pt
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from simclr_lightning.linear_eval import load_backbone_state


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
        prog="python -m simclr_lightning.export",
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
            f"in_channels={arch['in_channels']})  # from simclr_lightning.backbones"
        )
    print(
        f"wrote {args.output}; load it with:\n"
        f"    net = torchvision.models.{arch['backbone']}(){stem}\n"
        f"    net.load_state_dict(torch.load({str(args.output)!r}), strict=False)"
        f"  # only fc is missing"
    )


if __name__ == "__main__":
    main()
