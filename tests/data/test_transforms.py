"""The CPU views against google-research/simclr's data_util.py and data.py.

Numbers written down from the official code: ``random_blur`` calls
``gaussian_blur(kernel_size=height // 10)``, which takes ``radius = int(kernel_size / 2)`` and
``2 * radius + 1`` taps; fine-tuning / linear evaluation trains on
``preprocess_for_train(color_distort=False)``: ``crop_and_resize`` (area 0.08-1, aspect
3/4-4/3) then a random left-right flip, at every image size; evaluation centre-crops
``CROP_PROPORTION = 0.875`` only when ``image_size > 32``.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from simclr_lightning import CIFARDataModule, ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.data.transforms import classify_transform, eval_transform

# image size -> official blur taps (worked out by hand from the two lines above)
OFFICIAL_BLUR_TAPS = {224: 23, 160: 17, 96: 9, 64: 7, 32: 3, 28: 3, 16: 1}


@pytest.mark.parametrize(("size", "taps"), OFFICIAL_BLUR_TAPS.items())
def test_blur_kernel_is_the_official_one(size, taps):
    assert SimCLRAugmentation(image_size=size).kernel_size == taps


@pytest.mark.parametrize("size", [32, 96, 224])
def test_classification_view_is_random_resized_crop_and_flip(size):
    cfg = SimCLRAugmentation(image_size=size, mean=(0.5,) * 3, std=(0.25,) * 3)
    ops = classify_transform(cfg).transforms
    kinds = [type(op) for op in ops]
    assert kinds == [
        v2.ToImage,
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.ToDtype,
        v2.Normalize,
    ]
    crop = ops[1]
    assert tuple(crop.size) == (size, size)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert ops[2].p == 0.5
    # no colour distortion: a grey image stays grey and keeps its value
    grey = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    expected = torch.full((3, size, size), (128 / 255 - 0.5) / 0.25)
    torch.testing.assert_close(classify_transform(cfg)(grey), expected)


@pytest.mark.parametrize(
    ("size", "crops"), [(32, False), (28, False), (33, True), (64, True), (224, True)]
)
def test_evaluation_centre_crop_only_above_32_px(size, crops, tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    module = ImageFolderDataModule(str(tmp_path), augmentation=SimCLRAugmentation(image_size=size))
    assert module.eval_resize_ratio == (0.875 if crops else None)
    # the view itself: a 100x100 image with a marked border keeps its border only uncropped
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    image[:, :, :4] = 255
    view = eval_transform(size, (0, 0, 0), (1, 1, 1), module.eval_resize_ratio)(image)
    assert view.shape == (3, size, size)
    assert (view[0, :, 0].mean() > 0.5) is not crops


def test_cifar_linear_evaluation_uses_the_same_view():
    data = CIFARDataModule(task="classify", batch_size=8, num_workers=0)
    assert isinstance(data.train_transform().transforms[1], v2.RandomResizedCrop)
    assert data.eval_resize_ratio is None
