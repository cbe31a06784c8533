"""Both SimCLR views of a whole batch made on its device: kernels, parameter sampling, module."""

from simclr_lightning.data.gpu.augment import GPUAugment
from simclr_lightning.data.gpu.functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    solarize,
)
from simclr_lightning.data.gpu.sampling import (
    sample_crop_boxes,
    sample_pixel_params,
    sample_view_params,
)

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
    "sample_pixel_params",
    "sample_view_params",
    "solarize",
]
