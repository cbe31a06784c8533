"""SimCLR view augmentation for a whole batch on the device that holds it.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a
``[B, C, H, W]`` tensor every image gets the same crop, flip and jitter. SimCLR needs
independent views per image, and a per-image CPU pipeline is the bottleneck for CIFAR-size
data. :class:`GPUAugment` draws every parameter per sample (:mod:`.sampling`, torchvision's
laws) and applies the ops to the batch at once (:mod:`.functional`), driven by the same
:class:`~simclr_lightning.data.transforms.SimCLRAugmentation` as the CPU pipeline, in the
same order: random resized crop + flip; colour jitter with its four ops in a random order
per sample; grayscale; Gaussian blur; solarize; normalize.

Everything works on float32 in [0, 1]; the CPU pipeline works on uint8 until the end, so
it additionally truncates to a multiple of 1/255 after each op (torchvision's uint8 blends
and grayscale round down: about 1/255 darker at most per op, half that on average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_lightning.data.gpu.functional import (
    adjust_hue,
    blend,
    gaussian_blur,
    per_sample,
    resized_crop,
    rgb_to_grayscale,
    solarize,
)
from simclr_lightning.data.gpu.sampling import (
    jitter_ranges,
    sample_crop_boxes,
    sample_pixel_params,
    sample_view_params,
    to_device,
)
from simclr_lightning.data.transforms import SimCLRAugmentation

__all__ = ["GPUAugment"]

# Op ids of the jitter order, as in torchvision's ColorJitter ``fn_idx``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# One-size images are stacked into one batch (:meth:`GPUAugment.two_views`) only when each has
# at most this many pixels per pixel of a view. The stacked path holds the batch twice in
# float32, 8 bytes per decoded byte (75 GB for 256 phone photos of 4032 x 3024); the bound keeps
# that within 4 times the float views, the order of apply()'s own temporaries. CIFAR-size data
# (32 x 32 to 64 x 64 at image_size 32) keeps the faster stacked path.
STACK_MAX_PIXELS_PER_VIEW_PIXEL = 4

# torch's CUDA kernel for antialiased bilinear interpolate keeps a block's filter taps in shared
# memory, about 32 * taps_w + 33 * taps_h floats with taps = 2 * ceil(scale) + 1, against 48 KiB
# (12288 floats); past a downscale of about 94 on both sides (190 on one) it raises "Too much
# shared memory required". Up to 32 (65 taps a side: 4225 floats, a third of it, and under the
# limit with AMD's 64-wide wavefronts too) the kernel resizes a view; past that the separable
# matrices of resized_crop do, the same weights (the CPU kernel, which has no limit, agrees).
MAX_KERNEL_DOWNSCALE = 32


class GPUAugment(nn.Module):
    """Independent SimCLR views of a batch ``[B, C, H, W]`` (uint8, or float in [0, 1]).

    Same settings and meaning as :func:`~simclr_lightning.data.transforms.view_transform`,
    but every sample draws its own parameters. Returns float32 normalized
    ``[B, C, image_size, image_size]`` on the input's device. ``generator`` makes the
    draws reproducible; parameters are drawn on its device and moved to the images'.

    ``box_generator`` (a CPU generator) draws the crop boxes of a list of images of different
    sizes (:meth:`two_views_of_list`), which are read on the host to slice the crops: drawn
    on a GPU they would make the host wait for the device every batch. When it is None, a
    CPU ``generator`` draws them too (one stream), and a GPU one gets a CPU generator
    seeded from its own seed on first use.
    """

    def __init__(
        self,
        cfg: SimCLRAugmentation,
        generator: torch.Generator | None = None,
        box_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = generator
        self.box_generator = box_generator
        self.jitter_ranges = jitter_ranges(cfg)
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
        """Per-sample parameters for ``batch_size`` images (see :func:`sample_view_params`)."""
        return sample_view_params(self.cfg, batch_size, height, width, self.generator, device)

    def apply(self, images: Tensor, params: dict[str, Tensor], crop: bool = True) -> Tensor:
        """Apply given per-sample ``params`` (see :meth:`sample_params`) to ``images``;
        ``crop=False`` for images already cropped, resized and flipped with those params."""
        cfg = self.cfg
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        _check_dtype(images.dtype)
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
            x = torch.where(per_sample(params["grayscale"], x), rgb_to_grayscale(x, 3), x)
        if cfg.blur_prob > 0:
            blurred = gaussian_blur(x, cfg.kernel_size, params["sigma"])
            x = torch.where(per_sample(params["blur"], x), blurred, x)
        if cfg.solarize_prob > 0:
            x = torch.where(per_sample(params["solarize"], x), solarize(x), x)
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
            x = torch.where(per_sample(applied, x), adjust_hue(x, params["hue"]), x)
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
                per_sample(op == CONTRAST, x),
                gray.mean(dim=(-3, -2, -1), keepdim=True),
                torch.where(per_sample(op == SATURATION, x), gray, 0.0),
            )
            x = blend(x, other, per_sample(factor, x))
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

        The boxes are drawn on the host (:meth:`host_box_generator`) for each image's own size,
        so slicing the crops never waits for the device; everything else is drawn on
        ``generator``'s device. The loop: per image one copy to float of the region its two
        views read, and per view one resize with the antialiased bilinear ``interpolate``
        torchvision uses; scaling, flips and everything after run on the whole batch. Small
        images of one size are stacked and go through :meth:`two_views` instead.
        """
        first, size = images[0], self.cfg.image_size
        small = first.shape[-2] * first.shape[-1] <= STACK_MAX_PIXELS_PER_VIEW_PIXEL * size**2
        if small and len({(tuple(im.shape), im.dtype) for im in images}) == 1:
            return self.two_views(torch.stack(list(images)))  # uint8 stays uint8
        for image in images:
            _check_dtype(image.dtype)
        n, device = len(images), first.device
        heights = torch.tensor([im.shape[-2] for im in images]).repeat(2)
        widths = torch.tensor([im.shape[-1] for im in images]).repeat(2)
        cfg = self.cfg
        # with one CPU generator for both, the same draws in the same order as sample_params
        boxes = sample_crop_boxes(
            2 * n, heights, widths, cfg.crop_scale, cfg.crop_ratio, self.host_box_generator(), "cpu"
        )
        params = to_device(sample_pixel_params(cfg, 2 * n, self.generator), device)
        # Per image, the region its two views read goes to float in one copy (255 is divided
        # out after the resize, which is linear); one region at a time, so a batch of large
        # photographs never has all its pixels in float at once.
        tops, lefts, hs, ws = (b.tolist() for b in boxes)
        firsts, seconds = [], []  # the views of images[i]: i and n + i
        for i, image in enumerate(images):
            views = (i, n + i)
            y0, x0 = min(tops[j] for j in views), min(lefts[j] for j in views)
            y1 = max(tops[j] + hs[j] for j in views)
            x1 = max(lefts[j] + ws[j] for j in views)
            region = image[None, :, y0:y1, x0:x1].to(torch.float32)
            for j, crops in zip(views, (firsts, seconds), strict=True):
                top, left = tops[j] - y0, lefts[j] - x0
                crop = region[..., top : top + hs[j], left : left + ws[j]]
                crops.append(resize_view(crop, size))
        out = torch.cat(firsts + seconds)
        scale = [1.0 / 255.0 if im.dtype == torch.uint8 else 1.0 for im in images]
        if len(set(scale)) == 1:
            out = out.mul_(scale[0])
        else:  # uint8 and float images together: a rare list, scaled view by view
            for j in range(2 * n):
                out[j].mul_(scale[j % n])
        flip = params["flip"][:, None, None, None]
        out = torch.where(flip, out.flip(-1), out)
        views = self.apply(out, params, crop=False)
        return views[:n], views[n:]

    def host_box_generator(self) -> torch.Generator | None:
        """The CPU generator that draws the boxes of :meth:`two_views_of_list`: ``box_generator``,
        else ``generator`` when it is on the CPU (or None: torch's global one), else a CPU
        generator seeded from the GPU generator's seed, kept as ``box_generator``."""
        if self.box_generator is not None:
            return self.box_generator
        if self.generator is None or self.generator.device.type == "cpu":
            return self.generator
        self.box_generator = torch.Generator().manual_seed(
            derived_seed(self.generator.initial_seed())
        )
        return self.box_generator

    def extra_repr(self) -> str:
        return repr(self.cfg)


def resize_view(crop: Tensor, size: int) -> Tensor:
    """A crop ``[1, C, h, w]`` resized to ``size x size`` as antialiased bilinear ``interpolate``
    does, by matrices past the downscale its CUDA kernel refuses (``MAX_KERNEL_DOWNSCALE``)."""
    height, width = crop.shape[-2:]
    if max(height, width) <= MAX_KERNEL_DOWNSCALE * size:
        return F.interpolate(
            crop, (size, size), mode="bilinear", antialias=True, align_corners=False
        )
    # filled on the device, not copied from the host: a copy would make the host wait
    zero = torch.zeros(1, dtype=torch.long, device=crop.device)
    full_h = torch.full((1,), height, dtype=torch.long, device=crop.device)
    full_w = torch.full((1,), width, dtype=torch.long, device=crop.device)
    return resized_crop(crop, zero, zero, full_h, full_w, size)


def _check_dtype(dtype: torch.dtype) -> None:
    """Only uint8 and float images have a known range: uint16 pixels (a 16-bit PNG's) taken
    for floats in [0, 1] would make white views without a word."""
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"images must be uint8 or float in [0, 1], got {dtype}")


def derived_seed(seed: int) -> int:
    """A seed for a second stream drawn from ``seed``: the same seed for two generators of
    one kind would give equal draws, e.g. crop boxes equal to the jitter coins."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
