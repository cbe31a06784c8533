"""GPUAugment against torchvision as the independent reference, all on CPU.

Exact-semantics tests compare each batched op with torchvision's per-image functional
op on the same parameters; distribution tests compare the per-sample parameter draws
with torchvision's own ``make_params`` (two-sample KS statistics, binomial and
chi-square bounds). Seeds are fixed, so every test is deterministic.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from simclr_lightning.gpu_augment import (
    GPUAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)
from simclr_lightning.transforms import SimCLRAugmentation, view_transform

MEAN3, STD3 = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
N_DRAWS = 20_000
# Two-sample KS critical value at alpha = 0.001 for n = m = N_DRAWS: 1.95 * sqrt(2 / n).
KS_BOUND = 1.95 * math.sqrt(2 / N_DRAWS)


def _cfg(channels: int = 3, **changes) -> SimCLRAugmentation:
    mean, std = (MEAN3, STD3) if channels == 3 else ((0.5,), (0.25,))
    return SimCLRAugmentation(mean=mean, std=std, **changes)


def _identity_norm(channels: int, **changes) -> SimCLRAugmentation:
    """Normalization by mean 0, std 1, so outputs are the [0, 1] images themselves."""
    return SimCLRAugmentation(mean=(0.0,) * channels, std=(1.0,) * channels, **changes)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (ties handled by evaluating both ECDFs)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def _binomial_ok(mask: torch.Tensor, p: float, sigmas: float = 4.0) -> bool:
    n = mask.numel()
    tol = sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n)
    return abs(mask.float().mean().item() - p) <= tol


def _torchvision_boxes(height: int, width: int, cfg: SimCLRAugmentation, n: int) -> torch.Tensor:
    torch.manual_seed(1234)
    rrc = v2.RandomResizedCrop(cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)
    image = [tv_tensors.Image(torch.zeros(1, height, width, dtype=torch.uint8))]
    rows = []
    for _ in range(n):
        p = rrc.make_params(image)
        rows.append((p["top"], p["left"], p["height"], p["width"]))
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- shapes and ranges


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("in_h", "in_w"), [(32, 32), (20, 24), (48, 40)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shape_dtype_and_range(channels: int, in_h: int, in_w: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, channels, in_h, in_w), dtype=torch.uint8, generator=g)
    if dtype == torch.float32:
        images = images.float() / 255
    changes = dict(image_size=32, blur_prob=0.5, solarize_prob=0.5)
    aug = GPUAugment(_identity_norm(channels, **changes), torch.Generator().manual_seed(1))
    out = aug(images)
    assert out.shape == (8, channels, 32, 32)
    assert out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0  # before normalization: [0, 1]

    cfg = _cfg(channels, **changes)
    normalized = GPUAugment(cfg, generator=torch.Generator().manual_seed(1))(images)
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    assert normalized.shape == (8, channels, 32, 32)
    torch.testing.assert_close(normalized * std + mean, out, atol=1e-5, rtol=0)


def test_two_views_and_reproducibility() -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    v1, v2_ = GPUAugment(_cfg(), torch.Generator().manual_seed(5)).two_views(images)
    assert v1.shape == v2_.shape == (6, 3, 32, 32)
    assert not torch.equal(v1, v2_)
    w1, w2 = GPUAugment(_cfg(), torch.Generator().manual_seed(5)).two_views(images)
    assert torch.equal(v1, w1) and torch.equal(v2_, w2)
    other = GPUAugment(_cfg(), torch.Generator().manual_seed(6))(images)
    assert not torch.equal(other, v1)


def test_mean_std_required_and_channel_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="mean"):
        GPUAugment(SimCLRAugmentation(mean=None, std=None))
    with pytest.raises(ValueError, match="channels"):
        GPUAugment(_cfg(3))(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_identical_images_get_independent_views() -> None:
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    batch = image.expand(32, -1, -1, -1).contiguous()
    aug = GPUAugment(_cfg(blur_prob=0.5), generator=torch.Generator().manual_seed(2))
    params = aug.sample_params(32, 32, 32)
    boxes = torch.stack([params[k] for k in ("top", "left", "height", "width")], dim=1)
    assert len({tuple(b.tolist()) for b in boxes}) > 24
    for key in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert params[key].unique().numel() == 32, key
    assert 0 < params["flip"].sum() < 32
    assert len({tuple(o.tolist()) for o in params["order"]}) > 8
    out = aug.apply(batch, params).flatten(1)
    distinct = torch.cdist(out, out) + torch.eye(32) * 1e9
    assert distinct.min() > 1e-3  # no two views of the same image coincide


# ----------------------------------------------------------- parameter distributions


@pytest.mark.parametrize(("height", "width"), [(32, 32), (8, 100)])
def test_crop_boxes_match_torchvision_distribution(height: int, width: int) -> None:
    """(8, 100) fails many of the 10 attempts, exercising torchvision's fallback."""
    cfg = _cfg()
    ref = _torchvision_boxes(height, width, cfg, N_DRAWS)
    g = torch.Generator().manual_seed(99)
    mine = torch.stack(
        sample_crop_boxes(N_DRAWS, height, width, cfg.crop_scale, cfg.crop_ratio, g), dim=1
    ).double()

    def stats(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        top, left, h, w = boxes.unbind(1)
        return {
            "area": h * w / (height * width),
            "log_aspect": torch.log(w / h),
            "top": (top + 0.5) / (height - h + 1),  # position within the free range
            "left": (left + 0.5) / (width - w + 1),
        }

    ref_stats, my_stats = stats(ref), stats(mine)
    for key in ref_stats:
        assert _ks(my_stats[key], ref_stats[key]) < KS_BOUND, key
    # Every box lies inside the image, as torchvision's do.
    top, left, h, w = mine.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    if width > height:  # the fallback box (centre, clipped to the max ratio)
        fallback = torch.tensor([0.0, (100 - 11) // 2, 8, 11], dtype=torch.float64)
        ref_rate = (ref == fallback).all(1).float().mean().item()
        my_rate = (mine == fallback).all(1).float().mean().item()
        assert ref_rate > 0.05
        assert abs(my_rate - ref_rate) < 4 * math.sqrt(2 * ref_rate * (1 - ref_rate) / N_DRAWS)


def test_probabilities_factors_and_order_match_configuration() -> None:
    cfg = _cfg(blur_prob=0.5, solarize_prob=0.3, jitter_strength=1.0)
    aug = GPUAugment(cfg, generator=torch.Generator().manual_seed(3))
    p = aug.sample_params(N_DRAWS, 32, 32)
    assert _binomial_ok(p["flip"], cfg.hflip_prob)
    assert _binomial_ok(p["jitter"], cfg.jitter_prob)
    assert _binomial_ok(p["grayscale"], cfg.grayscale_prob)
    assert _binomial_ok(p["blur"], cfg.blur_prob)
    assert _binomial_ok(p["solarize"], cfg.solarize_prob)

    # Ranges as torchvision's ColorJitter builds them from the same config.
    jitter = v2.ColorJitter(*cfg.jitter)
    for key in ("brightness", "contrast", "saturation", "hue"):
        lo, hi = getattr(jitter, key)
        values = p[key].double()
        span = hi - lo
        assert values.min() >= lo and values.max() <= hi, key
        assert values.min() < lo + 0.01 * span and values.max() > hi - 0.01 * span, key
        uniform = lo + span * torch.rand(N_DRAWS, generator=torch.Generator().manual_seed(4))
        assert _ks(values, uniform) < KS_BOUND, key
    assert p["hue"].abs().max() <= cfg.jitter[3]

    lo, hi = cfg.blur_sigma
    assert p["sigma"].min() >= lo and p["sigma"].max() <= hi

    # Orders: permutations of 0..3, uniform over the 24 (chi-square, 23 dof, alpha 0.001).
    order = p["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(N_DRAWS, 4))
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256).double()
    perm_codes = [
        sum(v * m for v, m in zip(q, (64, 16, 4, 1), strict=True))
        for q in itertools.permutations(range(4))
    ]
    observed = counts[perm_codes]
    assert observed.sum() == N_DRAWS
    expected = N_DRAWS / 24
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 49.7


def test_disabled_ops_are_never_drawn() -> None:
    cfg = _cfg(hflip_prob=0.0, jitter_strength=0.0, grayscale_prob=0.0)
    p = GPUAugment(cfg, generator=torch.Generator().manual_seed(0)).sample_params(2000, 32, 32)
    for key in ("flip", "jitter", "grayscale", "blur", "solarize"):
        assert not p[key].any(), key
    cfg = _cfg(
        hflip_prob=1.0, jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0, solarize_prob=1.0
    )
    p = GPUAugment(cfg, generator=torch.Generator().manual_seed(0)).sample_params(2000, 32, 32)
    for key in ("flip", "jitter", "grayscale", "blur", "solarize"):
        assert p[key].all(), key


# ------------------------------------------------------------------ exact semantics


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


@pytest.mark.parametrize("channels", [1, 3])
def test_full_view_equals_torchvision_composition(channels: int) -> None:
    """apply() == torchvision's functional ops per image, in torchvision's order,
    with the same per-sample parameters (jitter order included)."""
    cfg = _cfg(channels, image_size=24, blur_prob=0.5, solarize_prob=0.3, jitter_strength=1.0)
    aug = GPUAugment(cfg, generator=torch.Generator().manual_seed(13))
    g = torch.Generator().manual_seed(14)
    images = torch.randint(0, 256, (96, channels, 30, 26), dtype=torch.uint8, generator=g)
    p = aug.sample_params(96, 30, 26)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    keys = ["brightness", "contrast", "saturation", "hue"]
    expected = []
    for i in range(96):
        y = TF.to_dtype(images[i], torch.float32, scale=True)
        box = [int(p[k][i]) for k in ("top", "left", "height", "width")]
        y = TF.resized_crop(y, *box, [24, 24], antialias=True)
        if p["flip"][i]:
            y = TF.horizontal_flip(y)
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                y = ops[op](y, float(p[keys[op]][i]))
        if p["grayscale"][i]:
            y = TF.rgb_to_grayscale(y, channels)
        if p["blur"][i]:
            y = TF.gaussian_blur(y, [cfg.kernel_size] * 2, [float(p["sigma"][i])] * 2)
        if p["solarize"][i]:
            y = TF.solarize(y, 0.5)
        expected.append(TF.normalize(y, list(cfg.mean), list(cfg.std)))
    torch.testing.assert_close(aug.apply(images, p), torch.stack(expected), atol=1e-4, rtol=0)


def test_view_statistics_match_cpu_pipeline() -> None:
    """End to end against view_transform itself (its own random draws): distributions
    of per-view mean, spread and channel imbalance over 1500 views of one image."""
    cfg = _cfg(blur_prob=0.5, solarize_prob=0.2)
    g = torch.Generator().manual_seed(15)
    base = torch.rand(3, 1, 1, generator=g) * torch.linspace(0, 1, 32).view(1, 1, 32)
    image = (base + 0.3 * torch.rand(3, 32, 32, generator=g)).clamp(0, 1).mul(255).to(torch.uint8)
    n = 1500
    torch.manual_seed(16)
    cpu = view_transform(cfg)
    ref = torch.stack([cpu(image) for _ in range(n)])
    aug = GPUAugment(cfg, generator=torch.Generator().manual_seed(17))
    mine = aug(image.expand(n, -1, -1, -1).contiguous())
    bound = 1.95 * math.sqrt(2 / n)

    def summary(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "mean": v.mean(dim=(1, 2, 3)),
            "std": v.std(dim=(1, 2, 3)),
            "red-blue": (v[:, 0] - v[:, 2]).mean(dim=(1, 2)),
            "left-right": (v[..., :16] - v[..., 16:]).mean(dim=(1, 2, 3)),
        }

    for key, values in summary(mine).items():
        assert _ks(values, summary(ref)[key]) < bound, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters() -> None:
    cfg = _cfg(blur_prob=0.5, solarize_prob=0.2)
    aug = GPUAugment(cfg, generator=torch.Generator().manual_seed(18))
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    params = aug.sample_params(64, 32, 32)
    expected = aug.apply(images, params)
    aug_cuda = aug.to("cuda")
    cuda_params = {k: v.cuda() for k, v in params.items()}
    out = aug_cuda.apply(images.cuda(), cuda_params)
    assert out.is_cuda
    # TF32 matmuls/convs (if enabled) bound the difference, not the algorithm.
    torch.testing.assert_close(out.cpu(), expected, atol=2e-2, rtol=0)
    assert GPUAugment(cfg).cuda()(images.cuda()).shape == (64, 3, 32, 32)
