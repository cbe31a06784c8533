"""The batched kernels against torchvision's per-image functional ops on the same parameters
(the independent reference), on CPU."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from simclr_lightning.data.gpu.functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    solarize,
)
from simclr_lightning.data.gpu.sampling import sample_crop_boxes


def _images(n: int = 12, channels: int = 3, h: int = 20, w: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, h, w, generator=g)
    x[0] = 0.5  # flat image: contrast mean, hue of grey pixels
    x[1, :, :4] = x[1, :1, :4]  # grey rows (max == min in HSV)
    x[2] = (x[2] > 0.5).float()  # saturated values 0 and 1
    return x


def _per_image(fn, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(img, float(f)) for img, f in zip(images, factors, strict=True)])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("mine", "reference", "low", "high", "atol"),
    [
        (adjust_brightness, TF.adjust_brightness, 0.0, 2.0, 1e-5),
        (adjust_contrast, TF.adjust_contrast, 0.0, 2.0, 1e-5),
        (adjust_saturation, TF.adjust_saturation, 0.0, 2.0, 1e-5),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-4),
    ],
)
def test_color_ops_equal_torchvision_per_image(channels, mine, reference, low, high, atol) -> None:
    x = _images(channels=channels)
    g = torch.Generator().manual_seed(7)
    factors = low + (high - low) * torch.rand(len(x), generator=g)
    factors[:2] = torch.tensor([low, high])
    torch.testing.assert_close(
        mine(x, factors), _per_image(reference, x, factors), atol=atol, rtol=0
    )


def test_grayscale_and_solarize_equal_torchvision() -> None:
    x = _images()
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=0, rtol=0)
    torch.testing.assert_close(rgb_to_grayscale(x, 3), TF.rgb_to_grayscale(x, 3), atol=0, rtol=0)
    gray = x[:, :1]
    torch.testing.assert_close(rgb_to_grayscale(gray, 3), TF.rgb_to_grayscale(gray, 3))
    torch.testing.assert_close(solarize(x, 0.5), TF.solarize(x, 0.5), atol=0, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
@pytest.mark.parametrize("channels", [1, 3])
def test_blur_equals_torchvision_per_sigma(kernel_size: int, channels: int) -> None:
    x = _images(channels=channels)
    sigma = torch.linspace(0.1, 2.0, len(x))
    expected = torch.stack(
        [
            TF.gaussian_blur(img, [kernel_size, kernel_size], [float(s), float(s)])
            for img, s in zip(x, sigma, strict=True)
        ]
    )
    torch.testing.assert_close(gaussian_blur(x, kernel_size, sigma), expected, atol=1e-5, rtol=0)


def _reference_crops(images, boxes, size, flip=None):
    out = []
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        y = TF.resized_crop(images[i], top, left, h, w, [size, size], antialias=True)
        out.append(TF.horizontal_flip(y) if flip is not None and flip[i] else y)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("in_h", "in_w", "size"),
    [(32, 32, 32), (24, 28, 32), (96, 96, 32), (80, 64, 24)],
    ids=["cifar-upscale", "upscale-nonsquare", "downscale", "downscale-nonsquare"],
)
def test_resized_crop_equals_torchvision(in_h: int, in_w: int, size: int) -> None:
    """Float input. Measured max |diff|: 1.8e-7 upscaling, 2.4e-7 downscaling (same
    antialias weights, float rounding only); asserted below 1e-5 for both."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(48, 3, in_h, in_w, generator=g)
    top, left, h, w = sample_crop_boxes(48, in_h, in_w, (0.08, 1.0), (3 / 4, 4 / 3), g)
    boxes = torch.stack([top, left, h, w], dim=1)
    flip = torch.rand(48, generator=g) < 0.5
    expected = _reference_crops(x, boxes, size, flip)
    out = resized_crop(x, top, left, h, w, size, flip=flip)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_resized_crop_close_to_torchvision_uint8_path() -> None:
    """The CPU pipeline resizes uint8 (rounding to 1/255); the float result is within it."""
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    top, left, h, w = sample_crop_boxes(48, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), g)
    expected = _reference_crops(x, torch.stack([top, left, h, w], 1), 32).float() / 255
    out = resized_crop(x.float() / 255, top, left, h, w, 32)
    assert (out - expected).abs().max() <= 1.01 / 255
