"""What the GPU augmentation tests share: configs, and the statistics that compare random draws
with torchvision's own (two-sample KS, binomial bounds)."""

from __future__ import annotations

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from simclr_lightning.data.transforms import SimCLRAugmentation

MEAN3, STD3 = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
N_DRAWS = 20_000
# Two-sample KS critical value at alpha = 0.001 for n = m = N_DRAWS: 1.95 * sqrt(2 / n).
KS_BOUND = 1.95 * math.sqrt(2 / N_DRAWS)


def config(channels: int = 3, **changes) -> SimCLRAugmentation:
    mean, std = (MEAN3, STD3) if channels == 3 else ((0.5,), (0.25,))
    return SimCLRAugmentation(mean=mean, std=std, **changes)


def identity_norm(channels: int, **changes) -> SimCLRAugmentation:
    """Normalization by mean 0, std 1, so outputs are the [0, 1] images themselves."""
    return SimCLRAugmentation(mean=(0.0,) * channels, std=(1.0,) * channels, **changes)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (ties handled by evaluating both ECDFs)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def binomial_ok(mask: torch.Tensor, p: float, sigmas: float = 4.0) -> bool:
    n = mask.numel()
    tol = sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n)
    return abs(mask.float().mean().item() - p) <= tol


def torchvision_boxes(height: int, width: int, cfg: SimCLRAugmentation, n: int) -> torch.Tensor:
    torch.manual_seed(1234)
    rrc = v2.RandomResizedCrop(cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)
    image = [tv_tensors.Image(torch.zeros(1, height, width, dtype=torch.uint8))]
    rows = []
    for _ in range(n):
        p = rrc.make_params(image)
        rows.append((p["top"], p["left"], p["height"], p["width"]))
    return torch.tensor(rows, dtype=torch.float64)
