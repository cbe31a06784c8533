"""Per-sample parameter draws against torchvision's own ``make_params`` and ColorJitter ranges
(two-sample KS statistics, binomial and chi-square bounds). Seeds are fixed, so every test is
deterministic."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms import v2

from simclr_lightning.data.gpu import GPUAugment
from simclr_lightning.data.gpu.sampling import sample_crop_boxes
from tests.data.gpu.stats import (
    KS_BOUND,
    N_DRAWS,
    binomial_ok,
    config,
    ks_statistic,
    torchvision_boxes,
)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (8, 100)])
def test_crop_boxes_match_torchvision_distribution(height: int, width: int) -> None:
    """(8, 100) fails many of the 10 attempts, exercising torchvision's fallback."""
    cfg = config()
    ref = torchvision_boxes(height, width, cfg, N_DRAWS)
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
        assert ks_statistic(my_stats[key], ref_stats[key]) < KS_BOUND, key
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
    cfg = config(blur_prob=0.5, solarize_prob=0.3, jitter_strength=1.0)
    aug = GPUAugment(cfg, generator=torch.Generator().manual_seed(3))
    p = aug.sample_params(N_DRAWS, 32, 32)
    assert binomial_ok(p["flip"], cfg.hflip_prob)
    assert binomial_ok(p["jitter"], cfg.jitter_prob)
    assert binomial_ok(p["grayscale"], cfg.grayscale_prob)
    assert binomial_ok(p["blur"], cfg.blur_prob)
    assert binomial_ok(p["solarize"], cfg.solarize_prob)

    # Ranges as torchvision's ColorJitter builds them from the same config.
    jitter = v2.ColorJitter(*cfg.jitter)
    for key in ("brightness", "contrast", "saturation", "hue"):
        lo, hi = getattr(jitter, key)
        values = p[key].double()
        span = hi - lo
        assert values.min() >= lo and values.max() <= hi, key
        assert values.min() < lo + 0.01 * span and values.max() > hi - 0.01 * span, key
        uniform = lo + span * torch.rand(N_DRAWS, generator=torch.Generator().manual_seed(4))
        assert ks_statistic(values, uniform) < KS_BOUND, key
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
    cfg = config(hflip_prob=0.0, jitter_strength=0.0, grayscale_prob=0.0)
    p = GPUAugment(cfg, generator=torch.Generator().manual_seed(0)).sample_params(2000, 32, 32)
    for key in ("flip", "jitter", "grayscale", "blur", "solarize"):
        assert not p[key].any(), key
    cfg = config(
        hflip_prob=1.0, jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0, solarize_prob=1.0
    )
    p = GPUAugment(cfg, generator=torch.Generator().manual_seed(0)).sample_params(2000, 32, 32)
    for key in ("flip", "jitter", "grayscale", "blur", "solarize"):
        assert p[key].all(), key
