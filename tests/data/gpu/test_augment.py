"""GPUAugment, the whole view, against torchvision's composition per image and against the CPU
pipeline's own random views, all on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from simclr_lightning.data.gpu import GPUAugment
from simclr_lightning.data.transforms import SimCLRAugmentation, view_transform
from tests.data.gpu.stats import config, identity_norm, ks_statistic
from tests.helpers import gpu_waits_raise


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("in_h", "in_w"), [(32, 32), (20, 24), (48, 40)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shape_dtype_and_range(channels: int, in_h: int, in_w: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, channels, in_h, in_w), dtype=torch.uint8, generator=g)
    if dtype == torch.float32:
        images = images.float() / 255
    changes = dict(image_size=32, blur_prob=0.5, solarize_prob=0.5)
    aug = GPUAugment(identity_norm(channels, **changes), torch.Generator().manual_seed(1))
    out = aug(images)
    assert out.shape == (8, channels, 32, 32)
    assert out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0  # before normalization: [0, 1]

    cfg = config(channels, **changes)
    normalized = GPUAugment(cfg, generator=torch.Generator().manual_seed(1))(images)
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    assert normalized.shape == (8, channels, 32, 32)
    torch.testing.assert_close(normalized * std + mean, out, atol=1e-5, rtol=0)


def test_two_views_and_reproducibility() -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    v1, v2_ = GPUAugment(config(), torch.Generator().manual_seed(5)).two_views(images)
    assert v1.shape == v2_.shape == (6, 3, 32, 32)
    assert not torch.equal(v1, v2_)
    w1, w2 = GPUAugment(config(), torch.Generator().manual_seed(5)).two_views(images)
    assert torch.equal(v1, w1) and torch.equal(v2_, w2)
    other = GPUAugment(config(), torch.Generator().manual_seed(6))(images)
    assert not torch.equal(other, v1)


def test_mean_std_required_and_channel_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="mean"):
        GPUAugment(SimCLRAugmentation(mean=None, std=None))
    with pytest.raises(ValueError, match="channels"):
        GPUAugment(config(3))(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_integer_images_other_than_uint8_are_refused() -> None:
    """A uint16 image (a 16-bit PNG's) was taken for floats in [0, 1]: white views."""
    aug = GPUAugment(config(3))
    deep = torch.full((2, 3, 32, 32), 40_000, dtype=torch.uint16)
    with pytest.raises(ValueError, match=r"uint8 or float in \[0, 1\], got torch.uint16"):
        aug.two_views(deep)
    with pytest.raises(ValueError, match="torch.uint16"):
        aug.two_views_of_list([deep[0], deep[1, :, :20]])


def test_a_float_image_among_uint8_ones_of_the_same_size_keeps_its_range() -> None:
    """Stacked together, uint8 images became floats of 0-255 and were clamped to white.
    Reference: the same list all in uint8, from a generator seeded the same."""
    images = list(torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8))
    mixed = [images[0], images[1].float() / 255, images[2]]
    want = GPUAugment(config(3), torch.Generator().manual_seed(2)).two_views_of_list(images)
    got = GPUAugment(config(3), torch.Generator().manual_seed(2)).two_views_of_list(mixed)
    for view, wanted in zip(got, want, strict=True):
        torch.testing.assert_close(view, wanted, rtol=0, atol=1e-5)


def test_identical_images_get_independent_views() -> None:
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    batch = image.expand(32, -1, -1, -1).contiguous()
    aug = GPUAugment(config(blur_prob=0.5), generator=torch.Generator().manual_seed(2))
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


@pytest.mark.parametrize("channels", [1, 3])
def test_full_view_equals_torchvision_composition(channels: int) -> None:
    """apply() == torchvision's functional ops per image, in torchvision's order,
    with the same per-sample parameters (jitter order included)."""
    cfg = config(channels, image_size=24, blur_prob=0.5, solarize_prob=0.3, jitter_strength=1.0)
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
    cfg = config(blur_prob=0.5, solarize_prob=0.2)
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
        assert ks_statistic(values, summary(ref)[key]) < bound, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters() -> None:
    cfg = config(blur_prob=0.5, solarize_prob=0.2)
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("generator", ["cuda", "cpu", None])
def test_views_of_a_gpu_batch_never_wait_for_the_gpu(generator) -> None:
    """A resident dataset's step (CIFAR, MNIST, ``resident: true``) only queues work (CUDA's
    sync detector raises on a wait). A GPU generator (what the data module seeds): a copy of
    a Python int to the GPU (as ``torch.as_tensor(size, device=...)`` makes) would wait. A CPU
    generator, or none (torch's global one, as a GPUAugment built by hand has): the host's
    draws must be queued to the GPU from page-locked memory, not copied blocking."""
    device = torch.device("cuda")
    cfg = config(image_size=32, blur_prob=0.5, solarize_prob=0.2)
    gen = torch.Generator(device=generator).manual_seed(0) if generator else None
    aug = GPUAugment(cfg, gen).to(device)
    images = torch.randint(0, 256, (64, 3, 40, 36), dtype=torch.uint8, device=device)
    aug.two_views(images)  # warm-up: CUDA libraries initialise on first use
    with gpu_waits_raise():
        view_a, view_b = aug.two_views(images)
    assert view_a.shape == view_b.shape == (64, 3, 32, 32) and view_a.is_cuda
