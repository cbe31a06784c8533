"""``simclr-lightning-export``: a checkpoint's encoder (and projection layers) as a plain state
dict, with the Python that rebuilds the network and the preprocessing it was pretrained with:

    simclr-lightning-export last.ckpt resnet18_simclr.pt [--head-layers 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from torch import nn

from simclr_lightning.checkpoint import export_backbone, preprocessing_path
from simclr_lightning.checkpoint_io import local_path
from simclr_lightning.errors import SettingError


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


def refuse_same_file(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """Refuse an output that is the checkpoint itself (same spelling, another spelling, or a
    symlink either way): the plain state dict would replace the Lightning checkpoint, and the
    run could no longer be resumed."""
    src, dst = local_path(checkpoint_path), local_path(output_path)
    same = os.fspath(src) == os.fspath(dst)
    if same or (os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst)):
        raise SettingError(
            f"output {os.fspath(output_path)} is the checkpoint {os.fspath(checkpoint_path)} "
            f"itself: the export would replace it and the run could no longer be resumed; give "
            f"another output path"
        )


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
    sidecar = str(preprocessing_path(args.output))
    print(f"wrote {args.output}; load it with:\n{rebuild_code(arch, str(args.output))}")
    print(preprocessing_code(arch.get("preprocessing"), sidecar))


def preprocessing_code(record: dict[str, Any] | None, sidecar: str) -> str:
    """Python (indented 4, to follow :func:`rebuild_code`) that prepares a PIL image as the
    encoder's pretraining data were (the evaluation view of
    :func:`~simclr_lightning.data.transforms.eval_transform`, with torchvision alone), or a
    comment where the checkpoint records nothing: with another normalisation (torchvision's
    ImageNet statistics for a CIFAR encoder) the features are not the pretrained ones. It
    converts the image first, as the library's reader does (RGB, or L for one channel): a
    PNG with alpha, a palette or CMYK image gave a tensor of the wrong number of channels."""
    if not record:
        return (
            "    # the checkpoint records no preprocessing: normalise inputs as its pretraining "
            "data were (that run's data.augmentation mean, std and image_size)"
        )
    size, ratio = record["image_size"], record.get("resize_ratio")
    resize = f"T.Resize(({size}, {size}))"
    if ratio is not None and ratio < 1:
        resize = f"T.Resize({math.ceil(size / ratio)}), T.CenterCrop({size})"
    mode = "L" if len(record["mean"]) == 1 else "RGB"  # a mean per channel
    return (
        f"    # its inputs as in pretraining ({size} px; also in {sidecar}):\n"
        f"    T = torchvision.transforms\n"
        f"    mean, std = {list(record['mean'])}, {list(record['std'])}\n"
        f'    convert = T.Lambda(lambda image: image.convert("{mode}"))  # RGBA, palette...\n'
        f"    preprocess = T.Compose([convert, {resize}, T.ToTensor(), T.Normalize(mean, std)])"
    )


def rebuild_code(arch: dict[str, Any], output: str) -> str:
    """Python (indented 4) that builds the encoder ``export_backbone`` wrote to ``output`` and
    loads it: the timm model with the run's ``timm_kwargs`` (``img_size`` sets a ViT's position
    embedding, which the file's must match), or torchvision's; for a file that records no
    architecture the one its shapes are, or where they tell nothing, what to build."""
    unknown = arch["backbone"] is None
    timm = unknown or arch["backbone"].startswith("timm:")  # no fc to miss, maybe none called
    strict = arch["fc"] or timm
    if unknown:
        build = (
            f"# {output} records no architecture and its shapes are no torchvision ResNet's: "
            f"build the network it came from\n    # (for LinearEval: --model.backbone, "
            f"--model.cifar_stem, --model.in_channels, --model.timm_kwargs), then load it:\n"
            f"    net = ...  # e.g. timm.create_model(name, num_classes=0, **timm_kwargs)"
        )
    elif timm:
        name = arch["backbone"].removeprefix("timm:")
        kwargs = "".join(f", {k}={v!r}" for k, v in (arch["timm_kwargs"] or {}).items())
        build = (
            f"net = timm.create_model({name!r}, num_classes=0, "
            f"in_chans={arch['in_channels']}{kwargs})"
        )
    else:
        build = f"net = torchvision.models.{arch['backbone']}()"
        if arch.get("inferred"):
            build = f"# {output} records no architecture: read from its shapes\n    {build}"
        if arch["cifar_stem"] or arch["in_channels"] != 3:
            build += (
                f"\n    apply_stem(net, cifar_stem={arch['cifar_stem']}, "
                f"in_channels={arch['in_channels']})  # from simclr_lightning import apply_stem"
            )
    load = ""
    scale = "  # ScaleBatchNorm1d: from simclr_lightning.heads"
    scale = scale if "Scale" in str(arch["fc"]) else ""
    if arch["fc"] and timm:  # its forward may not call fc
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
