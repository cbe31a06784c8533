"""Per-sample random parameters of a SimCLR view, drawn with torchvision's laws.

Every draw is made whatever the probabilities, so the random stream does not depend on
them, and everything is drawn at once for the batch (no loop, no host-device sync).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from simclr_lightning.data.transforms import SimCLRAugmentation

__all__ = ["jitter_ranges", "sample_crop_boxes", "sample_pixel_params", "sample_view_params"]


def sample_crop_boxes(
    n: int,
    height: int | Tensor,
    width: int | Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` boxes (top, left, height, width) with ``v2.RandomResizedCrop.make_params``'s law.

    ``height``/``width`` are one image size or ``[n]`` sizes, one per image. All 10 attempts
    are drawn at once and the first valid one is kept per sample; samples with none fall
    back to torchvision's centre crop. Sizes are rounded half to even like Python's
    ``round``; computed in float64 like torchvision's scalars.
    """
    f64 = torch.float64
    height, width = _sizes(height, n, device), _sizes(width, n, device)
    area = (height * width).to(f64)[:, None]
    u = torch.rand(n, 10, 2, generator=generator, device=device, dtype=f64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(target_area * aspect).round_().long()
    h = torch.sqrt(target_area / aspect).round_().long()
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid attempt
    found = ok.any(dim=1)

    in_ratio = width.to(f64) / height.to(f64)
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, (height.to(f64) * max(ratio)).round().long(), width)
    fh = torch.where(narrow, (width.to(f64) / min(ratio)).round().long(), height)
    w = torch.where(found, w.gather(1, first).squeeze(1), fw)
    h = torch.where(found, h.gather(1, first).squeeze(1), fh)

    pos = torch.rand(n, 2, generator=generator, device=device, dtype=f64)
    top = torch.minimum((pos[:, 0] * (height - h + 1)).long(), height - h)
    left = torch.minimum((pos[:, 1] * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    return top, left, h, w


def _sizes(size: int | Tensor, n: int, device: torch.device | str | None) -> Tensor:
    """``[n]`` int64 sizes on ``device``. One size is filled in there: ``as_tensor`` of a
    Python int would copy it from the host, which blocks the host every step."""
    if isinstance(size, Tensor):
        return size.to(device=device, dtype=torch.long).expand(n)
    return torch.full((n,), int(size), dtype=torch.long, device=device)


def jitter_ranges(cfg: SimCLRAugmentation) -> list[tuple[float, float] | None]:
    """torchvision's ColorJitter ranges for (brightness, contrast, saturation, hue); None
    where it would skip the op."""
    b, c, s, h = cfg.jitter
    return [
        _jitter_range(b, 1.0, clip=True),
        _jitter_range(c, 1.0, clip=True),
        _jitter_range(s, 1.0, clip=True),
        _jitter_range(h, 0.0, clip=False),
    ]


def sample_view_params(
    cfg: SimCLRAugmentation,
    batch_size: int,
    height: int | Tensor,
    width: int | Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Parameters for ``batch_size`` views of ``height x width`` images (or ``[B]`` sizes).

    Keys: ``top, left, height, width`` (crop boxes, int64, :func:`sample_crop_boxes`) and
    those of :func:`sample_pixel_params`, drawn in that order from one stream. Drawn on the
    generator's device, returned on ``device``.
    """
    draw_device = generator.device if generator is not None else device
    top, left, h, w = sample_crop_boxes(
        batch_size, height, width, cfg.crop_scale, cfg.crop_ratio, generator, draw_device
    )
    params = {"top": top, "left": left, "height": h, "width": w}
    params.update(sample_pixel_params(cfg, batch_size, generator, draw_device))
    return to_device(params, device) if device is not None else params


def to_device(params: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """``params`` on ``device``. Host draws go to a GPU from page-locked memory, queued: a
    blocking copy would wait for all the work queued before it, every batch (and the driver
    may wait so too to stage pageable memory). Copies to the host stay blocking, as their
    values are read at once."""
    if torch.device(device).type == "cpu":
        return {k: v.to(device) for k, v in params.items()}
    return {k: _pinned(v).to(device, non_blocking=True) for k, v in params.items()}


def _pinned(t: Tensor) -> Tensor:
    return t.pin_memory() if t.device.type == "cpu" and torch.cuda.is_available() else t


def sample_pixel_params(
    cfg: SimCLRAugmentation,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """A view's parameters after its crop box, which depend on no image size.

    Keys: ``flip``, ``jitter`` (jitter applied), ``brightness, contrast, saturation, hue``
    (float32 factors; identity values for ops the config disables), ``order`` (``[B, 4]``
    permutation of the op ids 0-3 = brightness, contrast, saturation, hue, applied left to
    right), ``grayscale``, ``blur``, ``sigma``, ``solarize``. Drawn on the generator's device
    (else ``device``); kept apart from the boxes so that images of different sizes can have
    their boxes drawn on the host (their slices are Python ints) and these on the GPU."""
    n, gen = batch_size, generator
    draw_device = gen.device if gen is not None else device
    coins = torch.rand(n, 5, generator=gen, device=draw_device)
    u = torch.rand(n, 5, generator=gen, device=draw_device)
    factors = []
    centres = (1.0, 1.0, 1.0, 0.0)
    for col, (rng, centre) in enumerate(zip(jitter_ranges(cfg), centres, strict=True)):
        if rng is None:
            factors.append(torch.full_like(u[:, col], centre))
        else:
            factors.append(rng[0] + (rng[1] - rng[0]) * u[:, col])
    order = torch.rand(n, 4, generator=gen, device=draw_device).argsort(dim=1)
    lo, hi = cfg.blur_sigma
    jitter_enabled = cfg.jitter_prob > 0 and cfg.jitter_strength > 0
    return {
        "flip": coins[:, 0] < cfg.hflip_prob,
        "jitter": (coins[:, 1] < cfg.jitter_prob) & jitter_enabled,
        "brightness": factors[0],
        "contrast": factors[1],
        "saturation": factors[2],
        "hue": factors[3],
        "order": order,
        "grayscale": coins[:, 2] < cfg.grayscale_prob,
        "blur": coins[:, 3] < cfg.blur_prob,
        "sigma": lo + (hi - lo) * u[:, 4],
        "solarize": coins[:, 4] < cfg.solarize_prob,
    }


def _jitter_range(value: float, centre: float, clip: bool) -> tuple[float, float] | None:
    # torchvision's ColorJitter._check_input for a single number.
    lo, hi = centre - value, centre + value
    if clip:
        lo = max(lo, 0.0)
    return None if lo == hi == centre else (lo, hi)
