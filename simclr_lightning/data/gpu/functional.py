"""Batched image kernels with a different parameter per sample: torchvision's colour,
blur and resized-crop semantics on ``[B, C, H, W]`` float images in [0, 1].

Each function matches its torchvision counterpart applied image by image to float rounding
(tested in ``tests/data/gpu/test_functional.py``). There is no Python loop over samples and
no host-device sync. Why the crop uses separable resampling matrices, and the measurements
behind that choice, are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blend",
    "gaussian_blur",
    "per_sample",
    "resized_crop",
    "rgb_to_grayscale",
    "solarize",
]


def per_sample(factor: Tensor | float, images: Tensor) -> Tensor:
    """Factors or masks ``[B]`` (or a scalar) shaped to broadcast over ``[B, C, H, W]``."""
    f = _on_device(factor, images)
    return f.reshape(-1, *([1] * (images.ndim - 1))) if f.ndim else f


def _on_device(factor: Tensor | float, images: Tensor) -> Tensor:
    """``factor`` on the images' device (in their dtype unless a mask). A Python number is
    filled in there: ``as_tensor`` would copy it from the host, which blocks the host."""
    if not isinstance(factor, Tensor):
        return torch.full((), factor, dtype=images.dtype, device=images.device)
    dtype = torch.bool if factor.dtype == torch.bool else images.dtype
    return factor.to(device=images.device, dtype=dtype)


def blend(image1: Tensor, image2: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's ``_blend``: ``image1 * r + image2 * (1 - r)``, clamped to [0, 1]."""
    return (image1 * ratio).add_(image2 * (1.0 - ratio)).clamp_(0.0, 1.0)


def rgb_to_grayscale(images: Tensor, num_output_channels: int = 1) -> Tensor:
    """ITU-R 601 luma with torchvision's weights; single-channel input passes through."""
    if images.shape[-3] == 1:
        return (
            images
            if num_output_channels == 1
            else images.expand(*images.shape[:-3], num_output_channels, *images.shape[-2:])
        )
    r, g, b = images.unbind(dim=-3)
    gray = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)
    if num_output_channels != 1:
        gray = gray.expand(*images.shape[:-3], num_output_channels, *images.shape[-2:])
    return gray


def adjust_brightness(images: Tensor, factor: Tensor | float) -> Tensor:
    """Scale intensities by a per-sample factor, clamped to [0, 1]."""
    return images.mul(per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with the mean of its own grayscale image (per sample)."""
    gray = rgb_to_grayscale(images) if images.shape[-3] == 3 else images
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return blend(images, mean, per_sample(factor, images))


def adjust_saturation(images: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the grayscale image; single-channel images are returned unchanged."""
    if images.shape[-3] == 1:
        return images
    return blend(images, rgb_to_grayscale(images), per_sample(factor, images))


def _rgb_to_hsv(image: Tensor) -> Tensor:
    # torchvision's _rgb_to_hsv (Pillow's algorithm), op for op.
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(-3)
    rc, gc, bc = ((maxc.unsqueeze(-3) - image) / divisor).unbind(dim=-3)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub(gc).mul_(~maxc_neq_r)
    hb = gc.add(4.0).sub_(rc).mul_(maxc_neq_r & ~maxc_eq_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(image: Tensor) -> Tensor:
    # torchvision's _hsv_to_rgb; the sector lookup is done with where() instead of a
    # gather table so that no host->device copy is needed.
    h, s, v = image.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.int32).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    r = torch.where((i == 0) | (i == 5), v, torch.where(i == 1, q, torch.where(i == 4, t, p)))
    g = torch.where(i == 0, t, torch.where((i == 1) | (i == 2), v, torch.where(i == 3, q, p)))
    b = torch.where(i == 2, t, torch.where((i == 3) | (i == 4), v, torch.where(i == 5, q, p)))
    return torch.stack((r, g, b), dim=-3)


def adjust_hue(images: Tensor, factor: Tensor | float) -> Tensor:
    """Rotate hue by a per-sample factor in [-0.5, 0.5] via HSV, as torchvision does."""
    if images.shape[-3] == 1:
        return images
    hsv = _rgb_to_hsv(images)
    h, s, v = hsv.unbind(dim=-3)
    f = _on_device(factor, images)
    h = h.add(f.reshape(-1, *([1] * (h.ndim - 1))) if f.ndim else f).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def solarize(images: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels at or above ``threshold`` (float images)."""
    return torch.where(images >= threshold, 1.0 - images, images)


def gaussian_blur(images: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Blur each image ``[B, C, H, W]`` with its own isotropic sigma ``[B]``.

    torchvision's kernel (softmax over the same linspace) and reflect padding; the
    2-D kernel is applied as two 1-D depthwise convs with one group per (sample,
    channel), which is equal up to float rounding.
    """
    b, c, h, w = images.shape
    half = kernel_size // 2
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=images.dtype, device=images.device)
    sigma = sigma.to(dtype=images.dtype, device=images.device)
    kernel = torch.softmax(x.div(sigma[:, None]).pow(2).neg(), dim=-1)  # [B, k]
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, k]
    out = F.pad(images, [half, half, half, half], mode="reflect")
    out = out.reshape(1, b * c, h + 2 * half, w + 2 * half)
    out = F.conv2d(out, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    return out.reshape(b, c, h, w)


def _resample_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """``[B, out, in]`` weights of torch's antialiased bilinear resize of ``[start, start+length)``.

    Same weights as ``interpolate(mode="bilinear", antialias=True, align_corners=False)``
    of the cropped axis: the triangle filter, widened by the scale when downscaling,
    restricted to the crop and renormalized (which also makes upscaling clamp at the
    crop border, like torchvision's crop-then-resize).
    """
    dev = start.device
    length_f = length.to(torch.float32)
    scale = (length_f / out_size)[:, None, None]
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5)[:, None]
    pos = torch.arange(in_size, device=dev, dtype=torch.float32) - start[:, None, None] + 0.5
    weight = (1.0 - (pos - centre).abs_().div_(support)).clamp_(min=0.0)
    weight = weight * ((pos > 0) & (pos < length_f[:, None, None]))
    return weight / weight.sum(dim=-1, keepdim=True)


def resized_crop(
    images: Tensor,
    top: Tensor,
    left: Tensor,
    height: Tensor,
    width: Tensor,
    size: int,
    flip: Tensor | None = None,
) -> Tensor:
    """Crop a box per sample and resize it to ``size x size`` (bilinear, antialiased).

    Matches ``v2.functional.resized_crop(img, top, left, height, width, [size, size],
    antialias=True)`` per image on float input; ``flip`` (bool ``[B]``) mirrors the
    result horizontally by reversing the rows of the horizontal matrix.
    """
    _, _, in_h, in_w = images.shape
    wy = _resample_matrix(top, height, in_h, size).to(images.dtype)  # [B, S, H]
    wx = _resample_matrix(left, width, in_w, size).to(images.dtype)  # [B, S, W]
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    # (Wy X) Wx^T and Wy (X Wx^T) are equal; the second product is cheaper when it
    # contracts the shorter input axis.
    if in_w <= in_h:
        return (wy[:, None] @ images) @ wx.transpose(1, 2)[:, None]
    return wy[:, None] @ (images @ wx.transpose(1, 2)[:, None])
