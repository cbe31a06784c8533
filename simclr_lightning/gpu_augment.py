"""SimCLR view augmentation for a whole batch on the device that holds it.

torchvision's v2 transforms draw one set of random parameters per call, so applied
to a ``[B, C, H, W]`` tensor every image gets the same crop, flip and jitter. SimCLR
needs independent views per image, and a per-image CPU pipeline is the bottleneck
for CIFAR-size data. :class:`GPUAugment` draws every parameter per sample (with
torchvision's distributions) and applies the ops to the batch at once, driven by the
same :class:`~simclr_lightning.transforms.SimCLRAugmentation` as the CPU pipeline
:func:`~simclr_lightning.transforms.view_transform`, with the same meaning:

1. random resized crop (torchvision's box sampling) + horizontal flip;
2. colour jitter with probability ``jitter_prob``, its four ops in a random order
   per sample;
3. random grayscale;
4. Gaussian blur (per-sample sigma, reflect padding);
5. solarize (threshold 0.5 on [0, 1] floats, i.e. 128 on uint8);
6. normalize with ``cfg.mean`` / ``cfg.std``.

Everything works on float32 in [0, 1]; the CPU pipeline works on uint8 until the
end, so it additionally rounds to multiples of 1/255 after each op (at most
0.5/255 per op). There is no Python loop over samples and no host-device sync.

Resampling choice (crop + resize)
---------------------------------
Batched ways to crop-and-resize with a different box per sample were compared against
torchvision's ``v2.functional.resized_crop(..., antialias=True)`` applied per image on
the same boxes (float32 images of uniform random pixels, the hardest case; boxes from
:func:`sample_crop_boxes`; device=CPU, torch 2.14.1, 1 thread on a shared 2-core
machine; max / mean |difference| over all pixels, and time per batch):

=====================================  ==========================  ==========================
method                                 32x32 -> 32, B=512          256x256 -> 224, B=32
=====================================  ==========================  ==========================
``roi_align`` (aligned, adaptive)      0.46 / 5.1e-3, 21 ms        0.35 / 4.2e-3, 31 ms
``affine_grid`` + ``grid_sample``      0.46 / 5.1e-3, 8 ms         0.35 / 2.3e-3, 24 ms
  same, grid clamped to the crop       1.8e-7 / 1.2e-8, 12 ms      0.16 / 1.8e-3, 28 ms
per-tap gather of the exact weights    1.2e-7, 18 ms               2.4e-7, 209 ms
separable resampling matrices (used)   1.8e-7 / 1.3e-8, 6 ms       2.4e-7 / 1.7e-8, 73-94 ms
torchvision, loop over images          reference, 20 ms            reference, 19 ms
=====================================  ==========================  ==========================

``roi_align`` samples outside the crop near its border (torchvision crops first and
clamps there) and its adaptive box average is not torch's triangle antialias filter;
``grid_sample`` clamped to the crop is exact when upscaling (every CIFAR crop) but has
no antialiasing when downscaling. The separable matrices reproduce the weights of
torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)`` on the
crop exactly (triangle filter widened by the scale when downscaling, renormalized at
the crop border), so they match torchvision to float rounding for every box; they are
used, and the flip is folded into the horizontal matrix for free. They are the
fastest for CIFAR-size crops. Downscaling large images on CPU, the dense matmuls
(which also multiply the zeros outside the crop) are ~4x slower than torchvision's
per-image kernels; on a GPU (not measured here: none was available) they are two
batched GEMMs of about 2*B*C*S*(H*W + S*W) flops, ~40 GFLOP for B=256 at 256 -> 224,
so fidelity decides. With TF32 matmuls enabled on CUDA
(``torch.set_float32_matmul_precision("high")``) the resample runs at TF32 precision
(error ~1e-3, below one uint8 step); torchvision's blur convs on GPU use TF32 by
default too.

Whole view, same machine and thread: B=512 CIFAR images (32 -> 32, default config)
take ~55 ms here against ~250 ms for ``view_transform`` looped over the images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import SimCLRAugmentation

__all__ = [
    "GPUAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "gaussian_blur",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
]

# Op ids of the jitter order, as in torchvision's ColorJitter ``fn_idx``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _per_sample(factor: Tensor | float, images: Tensor) -> Tensor:
    """Factors or masks ``[B]`` (or a scalar) shaped to broadcast over ``[B, C, H, W]``."""
    dtype = torch.bool if isinstance(factor, Tensor) and factor.dtype == torch.bool else None
    f = torch.as_tensor(factor, dtype=dtype or images.dtype, device=images.device)
    return f.reshape(-1, *([1] * (images.ndim - 1))) if f.ndim else f


def _blend(image1: Tensor, image2: Tensor, ratio: Tensor) -> Tensor:
    # torchvision's _blend: image1 * r + image2 * (1 - r), clamped to the float range.
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
    return images.mul(_per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with the mean of its own grayscale image (per sample)."""
    gray = rgb_to_grayscale(images) if images.shape[-3] == 3 else images
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, _per_sample(factor, images))


def adjust_saturation(images: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the grayscale image; single-channel images are returned unchanged."""
    if images.shape[-3] == 1:
        return images
    return _blend(images, rgb_to_grayscale(images), _per_sample(factor, images))


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
    f = torch.as_tensor(factor, dtype=images.dtype, device=images.device)
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
    height = torch.as_tensor(height, dtype=torch.long, device=device).expand(n)
    width = torch.as_tensor(width, dtype=torch.long, device=device).expand(n)
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


class GPUAugment(nn.Module):
    """Independent SimCLR views of a batch ``[B, C, H, W]`` (uint8, or float in [0, 1]).

    Same settings and meaning as :func:`~simclr_lightning.transforms.view_transform`,
    but every sample draws its own parameters. Returns float32 normalized
    ``[B, C, image_size, image_size]`` on the input's device. ``generator`` makes the
    draws reproducible; parameters are drawn on its device and moved to the images'.
    """

    def __init__(self, cfg: SimCLRAugmentation, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = generator
        b, c, s, h = cfg.jitter
        # torchvision's ColorJitter ranges; None where it would skip the op.
        self.jitter_ranges: list[tuple[float, float] | None] = [
            _jitter_range(b, 1.0, clip=True),
            _jitter_range(c, 1.0, clip=True),
            _jitter_range(s, 1.0, clip=True),
            _jitter_range(h, 0.0, clip=False),
        ]
        self.jitter_enabled = cfg.jitter_prob > 0 and cfg.jitter_strength > 0
        if cfg.mean is None or cfg.std is None:
            raise ValueError(
                "GPUAugment needs cfg.mean and cfg.std (None means the dataset's statistics, "
                "to be filled in before building it: cfg.replace(mean=..., std=...))"
            )
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)

    def sample_params(
        self, batch_size: int, height: int, width: int, device: torch.device | str | None = None
    ) -> dict[str, Tensor]:
        """Draw per-sample parameters for ``batch_size`` images of ``height x width``.

        Keys: ``top, left, height, width`` (crop boxes, int64), ``flip``, ``jitter``
        (jitter applied), ``brightness, contrast, saturation, hue`` (float32 factors;
        identity values for ops the config disables), ``order`` (``[B, 4]`` permutation
        of the op ids 0-3 = brightness, contrast, saturation, hue, applied left to
        right), ``grayscale``, ``blur``, ``sigma``, ``solarize``. Every draw is made
        whatever the probabilities, so the random stream does not depend on them.
        """
        cfg, n, gen = self.cfg, batch_size, self.generator
        draw_device = gen.device if gen is not None else device
        top, left, h, w = sample_crop_boxes(
            n, height, width, cfg.crop_scale, cfg.crop_ratio, gen, draw_device
        )
        coins = torch.rand(n, 5, generator=gen, device=draw_device)
        u = torch.rand(n, 5, generator=gen, device=draw_device)
        factors = []
        centres = (1.0, 1.0, 1.0, 0.0)
        for col, (rng, centre) in enumerate(zip(self.jitter_ranges, centres, strict=True)):
            if rng is None:
                factors.append(torch.full_like(u[:, col], centre))
            else:
                factors.append(rng[0] + (rng[1] - rng[0]) * u[:, col])
        order = torch.rand(n, 4, generator=gen, device=draw_device).argsort(dim=1)
        lo, hi = cfg.blur_sigma
        params = {
            "top": top,
            "left": left,
            "height": h,
            "width": w,
            "flip": coins[:, 0] < cfg.hflip_prob,
            "jitter": (coins[:, 1] < cfg.jitter_prob) & bool(self.jitter_enabled),
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
        return {k: v.to(device) for k, v in params.items()} if device is not None else params

    def apply(self, images: Tensor, params: dict[str, Tensor], crop: bool = True) -> Tensor:
        """Apply given per-sample ``params`` (see :meth:`sample_params`) to ``images``;
        ``crop=False`` for images already cropped, resized and flipped with those params."""
        cfg = self.cfg
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        if self.mean.shape[1] not in (1, images.shape[1]):
            raise ValueError(
                f"cfg.mean/std have {self.mean.shape[1]} values, "
                f"images have {images.shape[1]} channels"
            )
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).mul_(1.0 / 255.0)  # as v2.ToDtype(scale=True)
        else:
            x = images.to(torch.float32)
        if crop:
            x = resized_crop(
                x,
                params["top"],
                params["left"],
                params["height"],
                params["width"],
                cfg.image_size,
                flip=params["flip"],
            )
        # the matmul's rounding can leave [0, 1] by ~1e-7; without the crop x may be the caller's
        x = x.clamp_(0.0, 1.0) if crop else x.clamp(0.0, 1.0)
        if self.jitter_enabled:
            x = self._jitter(x, params)
        if cfg.grayscale_prob > 0 and x.shape[1] == 3:
            x = torch.where(_per_sample(params["grayscale"], x), rgb_to_grayscale(x, 3), x)
        if cfg.blur_prob > 0:
            blurred = gaussian_blur(x, cfg.kernel_size, params["sigma"])
            x = torch.where(_per_sample(params["blur"], x), blurred, x)
        if cfg.solarize_prob > 0:
            x = torch.where(_per_sample(params["solarize"], x), solarize(x), x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _jitter(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        # Per sample the order is: blends before hue, hue, blends after hue. Brightness,
        # contrast and saturation are all blend(x, other, f) with other = 0, the
        # grayscale mean, or the grayscale image, so one blend per position covers the
        # whole batch: each sample gets the op its permutation puts there, or factor 1
        # (an exact identity) when that slot is on the other side of its hue, disabled,
        # or the sample is not jittered. The costly hue op then runs once, through a
        # where(). No data-dependent shapes, so no host-device sync.
        applied = params["jitter"]
        order = params["order"]
        rgb = x.shape[1] == 3
        hue_on = self.jitter_ranges[HUE] is not None and rgb
        hue_pos = (order == HUE).to(torch.uint8).argmax(dim=1) if hue_on else None
        if hue_on:
            x = self._blend_slots(x, params, range(3), before=hue_pos)
            x = torch.where(_per_sample(applied, x), adjust_hue(x, params["hue"]), x)
            return self._blend_slots(x, params, range(1, 4), after=hue_pos)
        return self._blend_slots(x, params, range(4))

    def _blend_slots(
        self,
        x: Tensor,
        params: dict[str, Tensor],
        slots: range,
        before: Tensor | None = None,
        after: Tensor | None = None,
    ) -> Tensor:
        """Apply the brightness/contrast/saturation ops found at ``slots`` of each order."""
        order = params["order"]
        factors = torch.stack(
            [params["brightness"], params["contrast"], params["saturation"]], dim=1
        ).to(x.dtype)
        rgb = x.shape[1] == 3
        for slot in slots:
            op = order[:, slot]
            active = params["jitter"] & (op < HUE)
            if before is not None:
                active = active & (slot < before)
            if after is not None:
                active = active & (slot > after)
            for op_id in (BRIGHTNESS, CONTRAST, SATURATION):
                if self.jitter_ranges[op_id] is None or (op_id == SATURATION and not rgb):
                    active = active & (op != op_id)
            factor = torch.where(active, factors.gather(1, op.clamp(max=2)[:, None])[:, 0], 1.0)
            gray = rgb_to_grayscale(x) if rgb else x
            other = torch.where(
                _per_sample(op == CONTRAST, x),
                gray.mean(dim=(-3, -2, -1), keepdim=True),
                torch.where(_per_sample(op == SATURATION, x), gray, 0.0),
            )
            x = _blend(x, other, _per_sample(factor, x))
        return x

    def forward(self, images: Tensor) -> Tensor:
        """One random view per image, parameters drawn independently per sample."""
        b, _, h, w = images.shape
        return self.apply(images, self.sample_params(b, h, w, images.device))

    def two_views(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The SimCLR positive pair: two independent views of every image (one pass of 2B)."""
        both = self(torch.cat([images, images], dim=0))
        return both[: images.shape[0]], both[images.shape[0] :]

    def two_views_of_list(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Two views of every image in a list of ``[C, H, W]`` images of different sizes
        (a batch of decoded JPEGs), cropping from each full image as torchvision would.

        Boxes are drawn on the host for each image's own size; each crop is resized with
        the antialiased bilinear ``interpolate`` torchvision uses (a loop of 2 small kernels
        per image), and everything after the crop runs on the whole batch.
        """
        if len({tuple(im.shape) for im in images}) == 1:
            return self.two_views(torch.stack(list(images)))
        n, size = len(images), self.cfg.image_size
        device = images[0].device
        heights = torch.tensor([im.shape[-2] for im in images]).repeat(2)
        widths = torch.tensor([im.shape[-1] for im in images]).repeat(2)
        params = self.sample_params(2 * n, heights, widths)
        boxes = torch.stack([params[k] for k in ("top", "left", "height", "width")], 1).tolist()
        flips = params["flip"].tolist()
        out = torch.empty(2 * n, images[0].shape[0], size, size, device=device)
        for j, (top, left, h, w) in enumerate(boxes):
            crop = images[j % n][None, :, top : top + h, left : left + w].to(torch.float32)
            if images[j % n].dtype == torch.uint8:
                crop = crop.mul_(1.0 / 255.0)
            crop = F.interpolate(
                crop,
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            out[j] = crop[0].flip(-1) if flips[j] else crop[0]
        views = self.apply(out, {k: v.to(device) for k, v in params.items()}, crop=False)
        return views[:n], views[n:]

    def extra_repr(self) -> str:
        return repr(self.cfg)


def _jitter_range(value: float, centre: float, clip: bool) -> tuple[float, float] | None:
    # torchvision's ColorJitter._check_input for a single number.
    lo, hi = centre - value, centre + value
    if clip:
        lo = max(lo, 0.0)
    return None if lo == hi == centre else (lo, hi)
