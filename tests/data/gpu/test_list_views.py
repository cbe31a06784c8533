"""GPUAugment.two_views_of_list: which images are stacked into one batch, and views of crops
downscaled past what torch's CUDA kernel for antialiased interpolate accepts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simclr_lightning.data.gpu import GPUAugment, sample_crop_boxes, sample_pixel_params
from simclr_lightning.data.gpu.augment import MAX_KERNEL_DOWNSCALE, resize_view
from tests.data.gpu.stats import config
from tests.data.test_encoded import torchvision_views, view_sizes


@pytest.mark.parametrize(
    ("side", "size", "stacked"), [(32, 32, True), (64, 32, True), (66, 32, False)]
)
def test_small_images_of_one_size_are_stacked(monkeypatch, side: int, size: int, stacked: bool):
    """CIFAR-size images of one size keep the one-pass stacked path (two_views); larger ones
    go image by image so that the batch is never held in float."""
    images = list(torch.randint(0, 256, (6, 3, side, side), dtype=torch.uint8))
    aug = GPUAugment(config(image_size=size), torch.Generator().manual_seed(4))
    calls = []
    original = aug.two_views

    def spy(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(batch.shape)
        return original(batch)

    monkeypatch.setattr(aug, "two_views", spy)
    got = aug.two_views_of_list(images)
    assert calls == ([(6, 3, side, side)] if stacked else [])
    if stacked:
        again = GPUAugment(config(image_size=size), torch.Generator().manual_seed(4))
        want = again.two_views(torch.stack(images))
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize(("height", "width"), [(2100, 2100), (2100, 300), (90, 2100)])
def test_a_large_downscale_is_resized_as_interpolate_resizes(height: int, width: int):
    """Past MAX_KERNEL_DOWNSCALE the view is resized by matrices; their result is the CPU
    kernel's (which has no shared-memory limit) to float rounding."""
    assert max(height, width) > MAX_KERNEL_DOWNSCALE * 16
    crop = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(crop, (16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(resize_view(crop, 16), expected, rtol=0, atol=1e-5)


def test_the_kernel_never_resizes_past_its_downscale_limit(monkeypatch):
    """A very large photograph among small ones: interpolate (whose CUDA kernel raises "Too much
    shared memory required" past a downscale of about 94) never gets a crop downscaled more
    than MAX_KERNEL_DOWNSCALE, and every view is still torchvision's crop of the full image."""
    g = torch.Generator().manual_seed(1)
    images = [
        torch.randint(0, 256, (3, 2100, 2100), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g),
    ]
    # every crop of the large image keeps half its area at least: sides over 1200, scale over 75
    cfg = config(image_size=16, crop_scale=(0.5, 1.0))
    scales = []
    interpolate = F.interpolate

    def spy(x: torch.Tensor, size, **kwargs) -> torch.Tensor:
        scales.append(max(x.shape[-2] / size[0], x.shape[-1] / size[1]))
        return interpolate(x, size, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    view_a, view_b = GPUAugment(cfg, torch.Generator().manual_seed(2)).two_views_of_list(images)
    monkeypatch.undo()
    assert len(scales) == 2 and max(scales) <= MAX_KERNEL_DOWNSCALE  # the small image's views

    params = GPUAugment(cfg, torch.Generator().manual_seed(2)).sample_params(4, *view_sizes(images))
    boxes = [params[k] for k in ("top", "left", "height", "width")]
    assert min(int(boxes[2][0]), int(boxes[3][0]), int(boxes[2][2]), int(boxes[3][2])) > 1200
    expected = torchvision_views(images, boxes, params, cfg, 16)
    torch.testing.assert_close(torch.cat([view_a, view_b]), expected, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_of_a_very_large_photograph_on_cuda():
    """A 12-megapixel photograph at image_size 16: every crop is over 130 times the view on
    each side, past what the CUDA kernel for antialiased interpolate accepts (it raised "Too
    much shared memory required"); the views are torchvision's crops of the full image."""
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 4000, 3000), dtype=torch.uint8, generator=g)
    cfg = config(image_size=16, crop_scale=(0.5, 1.0))
    aug = GPUAugment(cfg, torch.Generator(device="cuda").manual_seed(4)).cuda()
    aug.host_box_generator()  # the CPU stream the boxes are drawn from
    box_state, pixel_state = aug.box_generator.get_state(), aug.generator.get_state()
    view_a, view_b = aug.two_views_of_list([image.cuda()])
    assert view_a.shape == view_b.shape == (1, 3, 16, 16) and view_a.is_cuda
    assert torch.isfinite(view_a).all() and torch.isfinite(view_b).all()

    box_gen = torch.Generator()
    box_gen.set_state(box_state)
    boxes = sample_crop_boxes(2, *view_sizes([image]), cfg.crop_scale, cfg.crop_ratio, box_gen)
    pixel_gen = torch.Generator(device="cuda")
    pixel_gen.set_state(pixel_state)
    pixel = {k: v.cpu() for k, v in sample_pixel_params(cfg, 2, pixel_gen).items()}
    expected = torchvision_views([image], boxes, pixel, cfg, 16)
    # TF32 convolutions (the blur) bound the difference, as in test_encoded's CUDA test
    torch.testing.assert_close(torch.cat([view_a, view_b]).cpu(), expected, rtol=0, atol=2e-2)
