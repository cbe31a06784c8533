"""SimCLR's view augmentation (paper, appendix A) as torchvision v2 pipelines.

The same :class:`SimCLRAugmentation` settings drive the CPU pipeline here and the
batched GPU pipeline, so a YAML config means the same thing on either path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from simclr_lightning.errors import require

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SimCLRAugmentation:
    """Parameters of one SimCLR view; defaults are the paper's CIFAR-10 settings.

    Colour jitter uses strength ``s``: brightness, contrast and saturation 0.8*s,
    hue 0.2*s, applied with ``jitter_prob``. ``blur_kernel_size`` None means the official
    code's kernel, ``2 * (image_size // 10 // 2) + 1`` taps (23 at 224 px, 9 at 96, 3 at 32).
    ``mean``/``std`` None means the dataset's own channel statistics, filled in by the data
    module.
    """

    image_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    jitter_strength: float = 0.5
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    solarize_prob: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def _check(ok: bool, name: str, value: object, allowed: str) -> None:
            require(ok, f"data.augmentation.{name}", value, allowed)

        _check(self.image_size >= 1, "image_size", self.image_size, "an integer >= 1")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "crop_scale", self.crop_scale, "0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        _check(0 < lo <= hi, "crop_ratio", self.crop_ratio, "0 < min <= max")
        for name in ("hflip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, name, value, "a probability in [0, 1]")
        # hue shifts by up to 0.2 x strength of a turn; torchvision allows at most half a turn
        s = self.jitter_strength
        _check(0 <= s <= 2.5, "jitter_strength", s, "in [0, 2.5] (hue 0.2 x strength <= 0.5)")
        lo, hi = self.blur_sigma
        _check(0 < lo <= hi, "blur_sigma", self.blur_sigma, "0 < min <= max")
        if self.blur_kernel_size is not None:
            k = self.blur_kernel_size
            # the blur pads each view by reflection, which needs k // 2 < the view's side
            size = self.image_size
            ok = k >= 1 and k % 2 == 1 and k // 2 < size
            _check(ok, "blur_kernel_size", k, f"an odd integer in [1, {2 * size - 1}]")
        if self.mean is not None and self.std is not None:
            _check(
                len(self.mean) == len(self.std) and all(s > 0 for s in self.std),
                "mean/std",
                (self.mean, self.std),
                "sequences of equal length with std > 0",
            )

    @classmethod
    def imagenet(cls, image_size: int = 224, **overrides) -> SimCLRAugmentation:
        """The paper's ImageNet settings: full-strength jitter and Gaussian blur."""
        base = dict(
            image_size=image_size,
            jitter_strength=1.0,
            blur_prob=0.5,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def kernel_size(self) -> int:
        if self.blur_kernel_size is not None:
            return self.blur_kernel_size
        # google-research/simclr data_util: random_blur(kernel_size=height // 10), and
        # gaussian_blur rounds that down to radius = kernel_size // 2, 2 * radius + 1 taps
        return 2 * (self.image_size // 10 // 2) + 1

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) bounds for the jitter strength."""
        s = self.jitter_strength
        return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s

    def normalised_as(self, mean: Sequence[float], std: Sequence[float]) -> SimCLRAugmentation:
        """These views with the data's ``mean``/``std`` where they name none. One given for
        another number of channels than the data's images have is refused here: the first
        batch would fail on it."""
        for name, given in (("mean", self.mean), ("std", self.std)):
            allowed = f"{len(mean)} values (one per channel of the images) or null"
            require(
                given is None or len(given) == len(mean),
                f"data.augmentation.{name}",
                given,
                allowed,
            )
        return self.replace(mean=self.mean or tuple(mean), std=self.std or tuple(std))

    def replace(self, **changes) -> SimCLRAugmentation:
        return dataclasses.replace(self, **changes)


# The paper's views per kind of data (frozen, so safe as shared defaults).
CIFAR_VIEWS = SimCLRAugmentation(image_size=32, jitter_strength=0.5)
MNIST_VIEWS = SimCLRAugmentation(image_size=28, jitter_strength=0.5)
IMAGENET_VIEWS = SimCLRAugmentation.imagenet(224)


def view_transform(cfg: SimCLRAugmentation) -> v2.Compose:
    """One random SimCLR view of a PIL image or uint8 tensor, as a normalized float tensor.

    Works on uint8 tensors until the final conversion: v2's uint8 kernels are the
    fast path on CPU.
    """
    b, c, s, h = cfg.jitter
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True
        ),
        v2.RandomHorizontalFlip(p=cfg.hflip_prob),
    ]
    if cfg.jitter_prob > 0 and cfg.jitter_strength > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=cfg.jitter_prob))
    if cfg.grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(p=cfg.grayscale_prob))
    if cfg.blur_prob > 0:
        ops.append(
            v2.RandomApply(
                [v2.GaussianBlur(cfg.kernel_size, sigma=cfg.blur_sigma)], p=cfg.blur_prob
            )
        )
    if cfg.solarize_prob > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=cfg.solarize_prob))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(ops)


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], resize_ratio: float | None = None
) -> v2.Compose:
    """Deterministic evaluation view: resize (then centre-crop when ``resize_ratio`` < 1)."""
    ops: list = [v2.ToImage()]
    if resize_ratio is None or resize_ratio >= 1:
        ops.append(v2.Resize((image_size, image_size), antialias=True))
    else:
        ops += [
            v2.Resize(int(math.ceil(image_size / resize_ratio)), antialias=True),
            v2.CenterCrop(image_size),
        ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(tuple(mean), tuple(std))]
    return v2.Compose(ops)


def classify_transform(cfg: SimCLRAugmentation) -> v2.Compose:
    """The single view of linear evaluation and fine-tuning, as google-research/simclr makes
    it at every image size (``preprocess_for_train(color_distort=False)``): random resized crop
    (area 0.08-1, aspect 3/4-4/3) and a horizontal flip, no colour distortion."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                cfg.image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


# google-research/simclr data_util.CROP_PROPORTION, applied only above 32 px (data.py: "Disable
# test cropping for small images (e.g. CIFAR)")
CROP_PROPORTION = 0.875


def eval_crop_ratio(image_size: int) -> float | None:
    """The centre-crop proportion of evaluation views: 0.875 above 32 px, none for CIFAR."""
    return CROP_PROPORTION if image_size > 32 else None


class TwoViews:
    """Applies a random view transform twice: the positive pair of SimCLR."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def preprocessing_of(datamodule) -> dict | None:
    """The evaluation preprocessing of ``datamodule`` (image size, normalisation, resize
    ratio), as checkpoints record it: prediction rebuilds it, and linear evaluation checks
    its normalisation against pretraining's. None for a data module without an augmentation
    (a user's own loaders)."""
    aug = getattr(datamodule, "augmentation", None)
    if aug is None or aug.mean is None or aug.std is None:  # the statistics not yet measured
        return None
    return {
        "image_size": aug.image_size,
        "mean": list(aug.mean),
        "std": list(aug.std),
        "resize_ratio": getattr(datamodule, "eval_resize_ratio", None),
    }
