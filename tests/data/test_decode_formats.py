"""Formats the image folders accept that torchvision's decoder does not read (BMP, TIFF,
PPM/PGM): on the device path (``augment: gpu``) they are read by PIL, as on the CPU path,
instead of being reported as corrupt. A file that PIL cannot read either is still named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_lightning import CorruptImageError, ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.data.encoded import ImageBatch, read_encoded
from tests.data.test_datamodules import fit_one_step_and_grab_batch

SIZES = [(17, 23), (32, 32), (9, 40)]  # (height, width)
FORMATS = [(".bmp", "RGB"), (".bmp", "L"), (".tiff", "RGB"), (".tif", "L")]
FORMATS += [(".ppm", "RGB"), (".pgm", "L")]


def write_images(folder: Path, suffix: str, mode: str, seed: int = 0) -> list[Path]:
    """Random 8-bit images of different sizes, saved by PIL as ``suffix``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        path = folder / f"{i:04d}{suffix}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def pil_pixels(path: Path) -> np.ndarray:
    """The reference: PIL's RGB pixels as ``[3, H, W]``."""
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize(("suffix", "mode"), FORMATS)
def test_formats_torchvision_cannot_read_decode_as_pil_reads_them(tmp_path, suffix, mode, decode):
    paths = write_images(tmp_path, suffix, mode)
    images = [read_encoded(str(p), decode=decode) for p in paths]
    assert all(im.decoded for im in images)  # read in the worker, not left for nvJPEG
    batch = ImageBatch(images)
    decoded, sources = batch.decode_with_sources("cpu")
    assert sources == [0, 1, 2]
    for image, path in zip(decoded, paths, strict=True):
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.numpy(), pil_pixels(path))


def test_a_16_bit_tiff_is_scaled_as_the_cpu_path_scales_it(tmp_path):
    """PIL opens it as mode I;16: the device path keeps the high byte, as the CPU path does."""
    values = np.random.default_rng(1).integers(0, 2**16, (12, 20), dtype=np.uint16)
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = read_encoded(str(path), decode=False)
    expected = np.repeat((values >> 8).astype(np.uint8)[None], 3, axis=0)
    np.testing.assert_array_equal(image.data.numpy(), expected)


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize(
    "content",
    [b"BM" + bytes(range(256)) * 2, None],  # a BMP header with garbage; a truncated BMP
    ids=["garbage", "truncated"],
)
def test_a_bmp_pil_cannot_read_is_still_named_as_corrupt(tmp_path, content, decode):
    if content is None:
        (good,) = write_images(tmp_path / "src", ".bmp", "RGB")[:1]
        content = good.read_bytes()[:100]
    bad = tmp_path / "0004.bmp"
    bad.write_bytes(content)
    with pytest.raises(CorruptImageError, match="0004.bmp") as failure:
        read_encoded(str(bad), decode=decode)
    assert failure.value.path == str(bad)


def test_gpu_augment_and_decode_train_on_bmp_files(tmp_path):
    """``augment: gpu`` + ``decode: gpu`` over a folder of BMPs: one real Trainer step (the
    device is the CPU here); the files were reported as corrupt before."""
    for k, name in enumerate(("a", "b")):
        write_images(tmp_path / "train" / name, ".bmp", "RGB", seed=k)
        write_images(tmp_path / "train" / name, ".pgm", "L", seed=10 + k)
    data = ImageFolderDataModule(
        str(tmp_path),
        augment="gpu",
        decode="gpu",
        batch_size=4,
        num_workers=0,
        augmentation=SimCLRAugmentation(image_size=16),
    )
    (x_a, x_b), labels = fit_one_step_and_grab_batch(data)
    assert x_a.shape == x_b.shape == (4, 3, 16, 16) and x_a.dtype == torch.float32
    assert torch.isfinite(x_a).all() and not torch.equal(x_a, x_b)
    assert set(labels.tolist()) <= {0, 1}


def deep_cases() -> dict[str, tuple[np.ndarray, str, np.ndarray]]:
    """``(values, suffix, expected 8-bit pixels)``: expectations worked out by hand from the
    documented rule (the image's own largest value fits 8 bits; negatives black)."""
    counts = np.array([[0, 16, 255], [4095, 2048, -3]], dtype=np.int32)  # 12-bit counts
    small = np.array([[0, 1, 100], [200, 255, 7]], dtype=np.int32)  # already 8-bit values
    unit = np.array([[0.0, 0.25, 0.5], [1.0, -0.5, 0.1]], dtype=np.float32)
    wide = np.array([[0.0, 500.0, 1000.0], [250.0, 1.0, 999.0]], dtype=np.float32)
    sixteen = np.array([[0, 256, 1000], [65535, 40000, 255]], dtype=np.uint16)
    return {
        "int32 12-bit counts": (counts, ".tif", np.array([[0, 1, 15], [255, 128, 0]])),
        "int32 small values": (small, ".tif", small),
        "float 0..1": (unit, ".tif", np.array([[0, 64, 128], [255, 0, 26]])),
        "float 0..1000": (wide, ".tif", np.array([[0, 128, 255], [64, 0, 255]])),
        "16-bit pgm": (sixteen, ".pgm", np.array([[0, 1, 3], [255, 156, 0]])),
    }


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize(
    "case",
    ["int32 12-bit counts", "int32 small values", "float 0..1", "float 0..1000", "16-bit pgm"],
)
def test_32_bit_and_float_images_are_not_blank(tmp_path, case, decode):
    """PIL opens a 32-bit integer TIFF as mode I and a float one as F: I was shifted by 23
    bits and F clipped by convert("RGB"), so both came out all black; a 16-bit PGM (mode I,
    not PNG) too."""
    values, suffix, expected = deep_cases()[case]
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I", "F")
    image = read_encoded(str(path), decode=decode)
    np.testing.assert_array_equal(image.data.numpy(), np.repeat(expected[None], 3, axis=0))
