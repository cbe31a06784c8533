"""Undecoded / variable-size images on the device path (``augment: gpu``, ``decode: gpu``),
run on CPU tensors: decoding matches PIL, crop boxes follow torchvision's law per image size,
and each view is torchvision's resized crop of the full image."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.v2 import functional as TF

from simclr_lightning import (
    CorruptImageError,
    CorruptImageWarning,
    ImageFolderDataModule,
    SimCLRAugmentation,
)
from simclr_lightning.data.corrupt import load_image, load_rgb
from simclr_lightning.data.encoded import ImageBatch, read_encoded
from simclr_lightning.data.gpu import GPUAugment, sample_crop_boxes, sample_pixel_params
from simclr_lightning.errors import SettingError
from tests.data.test_datamodules import fit_one_step_and_grab_batch
from tests.helpers import gpu_waits_raise

SIZES = [(37, 50), (64, 48), (33, 33), (20, 90), (90, 20), (45, 70)]


@pytest.fixture(scope="module")
def mixed_size_folder(cifar_jpg_root, tmp_path_factory) -> Path:
    """Real CIFAR photographs saved as JPEGs (and one PNG) at different sizes and shapes."""
    root = tmp_path_factory.mktemp("mixed")
    sources = sorted((cifar_jpg_root / "train" / "cat").iterdir())
    for i, (h, w) in enumerate(SIZES * 2):
        out = root / "train" / ("cat" if i % 2 else "dog")
        out.mkdir(parents=True, exist_ok=True)
        image = Image.open(sources[i]).convert("RGB").resize((w, h), Image.BICUBIC)
        suffix = ".png" if i == 3 else ".jpg"
        image.save(out / f"{i}{suffix}", quality=90)
    return root


def pil_pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_batch_decode_matches_pil_for_jpeg_and_png(mixed_size_folder):
    files = sorted((mixed_size_folder / "train").rglob("*.*"))
    batch = ImageBatch([read_encoded(str(f), decode=False) for f in files])
    assert sum(not im.decoded for im in batch.images) == len(files) - 1  # the PNG is decoded
    for image, path in zip(batch.decode("cpu"), files, strict=True):
        reference = pil_pixels(path)
        assert image.dtype == torch.uint8 and image.shape == reference.shape
        # both are libjpeg; allow for a different IDCT / upsampling choice
        assert (image.int() - reference.int()).abs().max() <= 2


def test_corrupt_jpeg_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9")
    batch = ImageBatch([read_encoded(str(bad), decode=False)])
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        batch.decode("cpu")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        read_encoded(str(bad), decode=True)


def test_boxes_for_mixed_sizes_are_each_images_own_law():
    """Row i of a mixed-size draw equals row i of a draw for image i's size alone (same
    random stream); the scalar draw is checked against torchvision in test_gpu_augment."""
    n = len(SIZES)
    heights = torch.tensor([h for h, _ in SIZES])
    widths = torch.tensor([w for _, w in SIZES])
    args = ((0.08, 1.0), (3 / 4, 4 / 3))
    mixed = sample_crop_boxes(n, heights, widths, *args, torch.Generator().manual_seed(3))
    for i, (h, w) in enumerate(SIZES):
        alone = sample_crop_boxes(n, h, w, *args, torch.Generator().manual_seed(3))
        assert [int(t[i]) for t in mixed] == [int(t[i]) for t in alone]
        top, left, bh, bw = (int(t[i]) for t in mixed)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w


def test_views_of_mixed_sizes_are_torchvision_crops_of_the_full_image(mixed_size_folder):
    files = sorted((mixed_size_folder / "train").rglob("*.*"))
    images = ImageBatch([read_encoded(str(f), decode=False) for f in files]).decode("cpu")
    cfg = SimCLRAugmentation(image_size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    view_a, view_b = GPUAugment(cfg, torch.Generator().manual_seed(7)).two_views_of_list(images)
    assert view_a.shape == view_b.shape == (len(images), 3, 24, 24)

    # the same draws (one stream, as sample_params), then torchvision's crop of each full image
    again = GPUAugment(cfg, torch.Generator().manual_seed(7))
    params = again.sample_params(2 * len(images), *view_sizes(images))
    boxes = [params[k] for k in ("top", "left", "height", "width")]
    expected = torchvision_views(images, boxes, params, cfg, 24)
    torch.testing.assert_close(torch.cat([view_a, view_b]), expected, rtol=0, atol=1e-5)
    assert not torch.equal(view_a, view_b)


def view_sizes(images) -> tuple[torch.Tensor, torch.Tensor]:
    """Heights and widths of both views' images: ``images`` twice over, as views 0..2n-1."""
    heights = torch.tensor([im.shape[-2] for im in images]).repeat(2)
    widths = torch.tensor([im.shape[-1] for im in images]).repeat(2)
    return heights, widths


def torchvision_views(images, boxes, pixel, cfg, size):
    """Independent reference: torchvision's crop + resize of each full image (as float in
    [0, 1]) with the given boxes, flipped as ``pixel`` says, then the pixel ops."""
    crops = []
    for j in range(len(boxes[0])):
        image = images[j % len(images)]
        image = image.float() / 255 if image.dtype == torch.uint8 else image
        top, left, h, w = (int(b[j]) for b in boxes)
        crop = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        crops.append(TF.horizontal_flip(crop) if pixel["flip"][j] else crop)
    return GPUAugment(cfg).apply(torch.stack(crops), pixel, crop=False)


def test_boxes_of_mixed_sizes_come_from_the_host_stream_the_rest_from_the_device_one(
    mixed_size_folder,
):
    """With a box generator of its own (what a GPU run has: boxes read on the host, the rest
    drawn on the GPU), the boxes are that stream's draw for each image's size, and the flips,
    jitter, blur ... are the pixel stream's; each view is torchvision's crop of the full image.
    A list of uint8 and float images together scales each by its own range."""
    files = sorted((mixed_size_folder / "train").rglob("*.*"))
    images = ImageBatch([read_encoded(str(f), decode=False) for f in files]).decode("cpu")
    images[1] = images[1].float() / 255  # a float image among uint8 ones
    cfg = SimCLRAugmentation(image_size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    aug = GPUAugment(cfg, torch.Generator().manual_seed(5), torch.Generator().manual_seed(11))
    view_a, view_b = aug.two_views_of_list(images)

    n = len(images)
    heights, widths = view_sizes(images)
    boxes = sample_crop_boxes(
        2 * n, heights, widths, cfg.crop_scale, cfg.crop_ratio, torch.Generator().manual_seed(11)
    )
    pixel = sample_pixel_params(cfg, 2 * n, torch.Generator().manual_seed(5))
    expected = torchvision_views(images, boxes, pixel, cfg, 24)
    torch.testing.assert_close(torch.cat([view_a, view_b]), expected, rtol=0, atol=1e-5)
    # the two streams are not one: boxes drawn from the pixel stream give other views
    wrong = sample_crop_boxes(
        2 * n, heights, widths, cfg.crop_scale, cfg.crop_ratio, torch.Generator().manual_seed(5)
    )
    assert not torch.allclose(torchvision_views(images, wrong, pixel, cfg, 24), expected)


class LargestOutput(TorchDispatchMode):
    """The most elements of any tensor an op returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("step", [7, 0], ids=["different sizes", "one size"])
def test_views_of_large_photographs_never_hold_the_batch_in_float(step: int):
    """Large photographs (a user's own folder) decoded on the device: the float copy is made
    of one image's region at a time, never of the whole batch's pixels, which would take 4
    times the decoded batch's memory on the device. Photographs of one camera all have one
    size: stacked into one batch for two_views, 256 of them ran the GPU out of memory."""
    images = [torch.randint(0, 256, (3, 300 + step * i, 400), dtype=torch.uint8) for i in range(8)]
    cfg = SimCLRAugmentation(image_size=16, mean=(0.5,) * 3, std=(0.2,) * 3)
    aug = GPUAugment(cfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    with LargestOutput() as seen:
        view_a, _ = aug.two_views_of_list(images)
    assert view_a.shape == (8, 3, 16, 16)
    assert seen.most <= max(im.numel() for im in images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_of_decoded_images_of_different_sizes_never_wait_for_the_gpu(mixed_size_folder):
    """``decode: gpu``: the crop boxes are read on the host to slice each image, so they are
    drawn on a CPU stream (seeded from the GPU generator's seed when none is given); drawing
    them on the GPU would make the host wait for the device every batch (CUDA's sync detector
    raises on a wait). The views match torchvision's crops with those boxes."""
    files = sorted((mixed_size_folder / "train").rglob("*.*"))
    images = ImageBatch([read_encoded(str(f), decode=True) for f in files]).decode("cuda")
    cfg = SimCLRAugmentation(image_size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    aug = GPUAugment(cfg, torch.Generator(device="cuda").manual_seed(3)).cuda()
    aug.two_views_of_list(images)  # warm-up: CUDA libraries initialise on first use
    box_state = aug.box_generator.get_state()
    pixel_state = aug.generator.get_state()
    with gpu_waits_raise():
        view_a, view_b = aug.two_views_of_list(images)
    assert aug.box_generator.device.type == "cpu"
    n = len(images)
    heights, widths = view_sizes(images)
    box_gen = torch.Generator()
    box_gen.set_state(box_state)
    boxes = sample_crop_boxes(2 * n, heights, widths, cfg.crop_scale, cfg.crop_ratio, box_gen)
    pixel_gen = torch.Generator(device="cuda")
    pixel_gen.set_state(pixel_state)
    pixel = {k: v.cpu() for k, v in sample_pixel_params(cfg, 2 * n, pixel_gen).items()}
    expected = torchvision_views([im.cpu() for im in images], boxes, pixel, cfg, 24)
    # TF32 convolutions (the blur, where cuDNN allows them) bound the difference, as in
    # test_cuda_matches_cpu_for_the_same_parameters; other boxes would differ by far more
    torch.testing.assert_close(torch.cat([view_a, view_b]).cpu(), expected, rtol=0, atol=2e-2)


def test_decode_on_device_trains_from_the_cli_settings(mixed_size_folder):
    """``augment: gpu`` + ``decode: gpu`` through a real Trainer step (device = CPU here)."""
    data = ImageFolderDataModule(
        str(mixed_size_folder),
        augment="gpu",
        decode="gpu",
        batch_size=6,
        num_workers=0,
        augmentation=SimCLRAugmentation(image_size=32),
    )
    (x_a, x_b), labels = fit_one_step_and_grab_batch(data)
    assert x_a.shape == x_b.shape == (6, 3, 32, 32) and x_a.dtype == torch.float32
    assert torch.isfinite(x_a).all() and not torch.equal(x_a, x_b)
    assert set(labels.tolist()) <= {0, 1}


def test_bad_decode_setting_is_named(mixed_size_folder):
    with pytest.raises(ValueError, match="data.decode='nvjpeg' is invalid"):
        ImageFolderDataModule(str(mixed_size_folder), decode="nvjpeg")


def test_resident_image_folder_holds_every_training_image(cifar_tiny):
    data = ImageFolderDataModule(
        str(cifar_tiny),
        augment="gpu",
        resident=True,
        batch_size=8,
        num_workers=0,
        augmentation=SimCLRAugmentation(image_size=32),
    )
    data.setup("fit")
    store = data.device_store
    samples = data.train_set.samples
    assert store.images.shape == (len(samples), 3, 32, 32) and store.images.dtype == torch.uint8
    for i in (0, len(samples) // 2, len(samples) - 1):
        path, label = samples[i]
        assert (store.images[i].int() - pil_pixels(Path(path)).int()).abs().max() <= 2
        assert int(store.labels[i]) == label
    # the kNN monitor's memory bank still gets plain eval images
    bank_images, bank_labels = next(iter(data.eval_train_dataloader()))
    assert bank_images.shape == (8, 3, 32, 32) and bank_images.dtype == torch.float32
    indices = next(iter(data.train_dataloader()))
    (view_a, view_b), labels = data.device_views(indices)
    assert view_a.shape == (8, 3, 32, 32) and torch.equal(labels, store.labels[indices])


def test_resident_needs_one_image_size(mixed_size_folder):
    data = ImageFolderDataModule(
        str(mixed_size_folder), augment="gpu", resident=True, batch_size=4, num_workers=0
    )
    with pytest.raises(SettingError, match="data.resident=true needs training images of one size"):
        data.setup("fit")


def test_undecoded_batches_cross_from_loader_workers(mixed_size_folder):
    """A worker hands the batch over through shared memory (a mapped-file tensor cannot be,
    and then the loader hangs: hence the alarm)."""
    import signal

    data = ImageFolderDataModule(
        str(mixed_size_folder),
        augment="gpu",
        decode="gpu",
        batch_size=4,
        num_workers=1,
        persistent_workers=False,
    )
    data.setup("fit")
    signal.alarm(60)
    try:
        batches = list(data.train_dataloader())
    finally:
        signal.alarm(0)
    assert len(batches) == 3 and all(isinstance(b, ImageBatch) for b, _ in batches)
    images = [im for b, _ in batches for im in b.decode("cpu")]
    assert sorted(tuple(im.shape[1:]) for im in images) == sorted(SIZES * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_spares_memory_that_queued_kernels_still_read():
    """nvJPEG writes from a stream of its own (pytorch/vision#9606): the decode must not be
    handed blocks that kernels still queued on the current stream are going to read."""
    from simclr_lightning import sample_root

    files = sorted((sample_root() / "train" / "cat").iterdir())[:64]
    batch = ImageBatch([read_encoded(str(f), decode=False) for f in files])
    reference = [image.cpu() for image in batch.decode("cuda")]  # also the decoder's warm-up
    wrong = 0
    for _ in range(20):
        # blocks the size of the decoded images, freed while their readers are still queued
        tensors = [torch.full((3, 32, 32), i, dtype=torch.uint8, device="cuda") for i in range(64)]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of queued work before the sums
        sums = [t.sum() for t in tensors]
        del tensors
        decoded = batch.decode("cuda")
        torch.cuda.synchronize()
        wrong += sum(int(total) != i * 3 * 32 * 32 for i, total in enumerate(sums))
        assert all(torch.equal(a.cpu(), b) for a, b in zip(decoded, reference, strict=True))
    assert wrong == 0


BROKEN = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"  # JPEG's markers, no JPEG inside


def test_an_undecodable_slot_gets_the_next_image_that_decoded(mixed_size_folder, tmp_path):
    """Files that pass the workers' marker check and fail every decoder: with ``skips`` each
    is added to it once and its slot holds the next good image of the batch (wrapping)."""
    from simclr_lightning.data.corrupt import DeviceSkips

    class Recorded(DeviceSkips):
        def __init__(self) -> None:
            super().__init__()
            self.added: list[str] = []

        def add(self, err: CorruptImageError) -> None:  # every file found bad by decoding
            self.added.append(err.path)
            super().add(err)

    good = sorted((mixed_size_folder / "train" / "cat").glob("*.jpg"))[:2]
    bad = [tmp_path / "bad_a.jpg", tmp_path / "bad_b.jpg"]
    for path in bad:
        path.write_bytes(BROKEN)
    files = [good[0], bad[0], good[1], bad[1]]
    batch = ImageBatch([read_encoded(str(f), decode=False) for f in files])
    assert not any(im.decoded for im in batch.images)  # all four passed the marker check

    skips = Recorded()
    with pytest.warns(CorruptImageWarning) as caught:
        images = batch.decode("cpu", skips)
    assert skips.added == [str(p) for p in bad]
    assert [str(p) in str(w.message) for w in caught for p in bad].count(True) == 2
    assert (images[0].int() - pil_pixels(good[0]).int()).abs().max() <= 2
    assert images[1] is images[2] and images[3] is images[0]  # the next one that decoded

    known = Recorded()
    known.reasons[str(bad[1])] = "found before"
    with pytest.warns(CorruptImageWarning):
        again = batch.decode("cpu", known)
    assert known.added == [str(bad[0])]  # a known one is not decoded again
    assert all(torch.equal(x, y) for x, y in zip(again, images, strict=True))

    with pytest.raises(CorruptImageError, match="bad_a.jpg"):  # nothing to serve instead
        ImageBatch([read_encoded(str(p), decode=False) for p in bad]).decode("cpu", Recorded())


def test_skip_corrupt_covers_files_only_the_device_decoder_finds(mixed_size_folder, tmp_path):
    """``decode: gpu`` (the device is the CPU here): a file the workers pass on undecoded and
    no decoder reads is named once in a run that meets it every epoch, and every batch keeps
    its size. Without ``skip_corrupt`` the run stops naming it."""
    import shutil
    import warnings

    import lightning as L

    from simclr_lightning import CorruptImageWarning, SimCLR
    from tests.helpers import quiet_trainer

    root = tmp_path / "data"
    shutil.copytree(mixed_size_folder, root)
    (root / "train" / "cat" / "zz_broken.jpg").write_bytes(BROKEN)
    n_files = len(list((root / "train").rglob("*.*")))
    sizes: list[int] = []

    class Sizes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(len(batch[1]))

    def fit(skip: bool) -> list[str]:
        data = ImageFolderDataModule(
            str(root),
            augment="gpu",
            decode="gpu",
            batch_size=n_files,  # every file in every step
            num_workers=0,
            skip_corrupt=skip,
            augmentation=SimCLRAugmentation(image_size=16),
        )
        trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[Sizes()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CorruptImageWarning)
            trainer.fit(SimCLR(head_hidden_dim=16, head_output_dim=8), data)
        assert trainer.global_step == 3
        return [str(w.message) for w in caught if w.category is CorruptImageWarning]

    named = fit(skip=True)
    assert len(named) == 1 and "zz_broken.jpg" in named[0] and "on the device" in named[0]
    assert sizes == [n_files] * 3
    with pytest.raises(CorruptImageError, match="zz_broken.jpg"):
        fit(skip=False)


def test_a_skipped_slot_gets_its_substitutes_label_with_its_pixels(cifar_jpg_root, tmp_path):
    """``decode: gpu`` + ``skip_corrupt``: the slot of a file only the device's decoder finds
    bad holds the next image of the batch, and that image's label (the file's own class is
    not what the pixels show), as the CPU path serves its substitute with its own label."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins import Precision

    from simclr_lightning.data.encoded import collate_encoded

    for name in ("airplane", "automobile"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for src in sorted((cifar_jpg_root / "train" / name).iterdir())[:2]:
            (tmp_path / "train" / name / src.name).write_bytes(src.read_bytes())
    bad = sorted((tmp_path / "train" / "airplane").iterdir())[1]  # label 0, in slot 1
    bad.write_bytes(BROKEN)
    data = ImageFolderDataModule(
        str(tmp_path),
        augment="gpu",
        decode="gpu",
        skip_corrupt=True,
        batch_size=4,
        num_workers=0,
        augmentation=SimCLRAugmentation(image_size=16),
    )
    dataset = data.make_dataset("train", None)
    files = [Path(path) for path, _ in dataset.samples]
    classes = [0, 0, 1, 1]  # the class folders, sorted: airplane, automobile
    assert files[1] == bad and [label for _, label in dataset.samples] == classes
    batch = collate_encoded([dataset[i] for i in range(4)])
    assert not any(image.decoded for image in batch[0].images)  # bad passed the marker check

    with pytest.warns(CorruptImageWarning, match=bad.name):
        images = batch[0].decode("cpu", data.device_skips)
    good = [f for f in files if f != bad]
    holds = []  # the file whose pixels each slot holds
    for image in images:
        diffs = [(image.int() - pil_pixels(f).int()).abs().max() for f in good]
        holds.append(good[int(np.argmin(diffs))])
        assert min(diffs) <= 2
    assert holds == [files[0], files[2], files[2], files[3]]  # slot 1: the next that decoded

    # what the training hook serves with the views: each slot's label is its pixels' file's
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    data.trainer = SimpleNamespace(
        training=True, world_size=1, global_rank=0, strategy=cpu, precision_plugin=Precision()
    )
    data.setup("fit")
    (view_a, _), labels = data.on_after_batch_transfer(batch, 0)
    assert view_a.shape == (4, 3, 16, 16)
    assert labels.tolist() == [classes[files.index(f)] for f in holds] == [0, 1, 1, 1]


def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB PNG, written by hand (PIL writes none): each row is filter byte 0 and its
    big-endian samples, zlib-compressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    height, width, _ = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, RGB
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


def deep_png(path: Path, height: int, width: int, seed: int) -> tuple[Path, torch.Tensor]:
    """A 16-bit PNG of random values, and the 8-bit pixels PIL reads from it (the high byte
    of each value)."""
    values = np.random.default_rng(seed).integers(0, 2**16, (height, width, 3), dtype=np.uint16)
    write_png16(path, values)
    high_bytes = torch.from_numpy((values >> 8).astype(np.uint8)).permute(2, 0, 1)
    assert Image.open(path).mode == "RGB" and torch.equal(pil_pixels(path), high_bytes)
    return path, high_bytes


def test_a_16_bit_png_is_read_as_pil_reads_it(mixed_size_folder, tmp_path):
    """torchvision decodes a 16-bit PNG to uint16: packed with 8-bit images the batch failed
    to form, alone its views were taken for floats in [0, 1] (all white). It is read as 8-bit
    pixels, as PIL reads it for the CPU path."""
    path, expected = deep_png(tmp_path / "deep.png", 20, 30, seed=0)
    image = read_encoded(str(path), decode=False)  # not a JPEG: decoded in the worker
    assert image.decoded and image.data.dtype == torch.uint8
    assert torch.equal(image.data, expected)

    jpeg = sorted((mixed_size_folder / "train" / "cat").glob("*.jpg"))[0]
    batch = ImageBatch([read_encoded(str(jpeg), decode=False), image])  # bytes and pixels
    decoded = batch.decode("cpu")
    assert (decoded[0].int() - pil_pixels(jpeg).int()).abs().max() <= 2
    assert torch.equal(decoded[1], expected)
    cfg = SimCLRAugmentation(image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3, jitter_prob=0)
    view_a, _ = GPUAugment(cfg, torch.Generator().manual_seed(0)).two_views_of_list(decoded)
    assert view_a[1].std() > 0.1  # a random image's crop, not a white one


def test_resident_store_holds_16_bit_pngs_as_8_bit(tmp_path):
    """``resident: true`` decodes the training split once into one uint8 tensor: 16-bit
    PNGs among 8-bit ones are stored as PIL reads them."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    expected = dict(deep_png(folder / f"{i}.png", 8, 8, seed=i) for i in range(2))
    eight_bit = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(eight_bit).save(folder / "2.png")
    expected[folder / "2.png"] = torch.from_numpy(eight_bit).permute(2, 0, 1)
    data = ImageFolderDataModule(
        str(tmp_path), augment="gpu", resident=True, batch_size=2, num_workers=0
    )
    data.setup("fit")
    store = data.device_store
    assert store.images.dtype == torch.uint8 and store.images.shape == (3, 3, 8, 8)
    for row, (path, _) in zip(store.images, data.train_set.samples, strict=True):
        assert torch.equal(row, expected[Path(path)])


def test_a_16_bit_grayscale_png_is_scaled_on_the_cpu_path_as_on_the_device_path(tmp_path):
    """PIL opens a 16-bit grayscale PNG as mode I;16 and its ``convert`` clips values over
    255 (a near-white image); the CPU path scales it to 8 bits as the device decoder does."""
    ramp = (np.arange(24 * 32, dtype=np.uint32) * 85).astype(np.uint16).reshape(24, 32)
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    header = path.read_bytes()[16:26]  # IHDR: width, height, bit depth, colour type
    assert struct.unpack(">IIBB", header) == (32, 24, 16, 0)  # 16-bit grayscale
    expected = np.repeat((ramp >> 8).astype(np.uint8)[None], 3, axis=0)  # the high byte

    rgb = np.array(load_rgb(str(path))).transpose(2, 0, 1)
    assert np.array_equal(rgb, expected)
    assert np.array_equal(np.array(load_image(str(path), "L")), expected[0])  # grayscale model
    device = read_encoded(str(path), decode=False)  # not a JPEG: decode_rgb8 in the worker
    assert device.decoded and np.array_equal(device.data.numpy(), expected)


def test_a_32_bit_integer_image_is_scaled_as_torchvision_scales_int32(tmp_path):
    """PIL's mode I from a 32-bit TIFF: the top 8 of int32's 31 value bits, negatives black."""
    values = np.array([[-5, 0, 2**23 - 1, 2**23], [2**30, 2**31 - 1, 7 * 2**23, 255 * 2**23]])
    path = tmp_path / "deep.tif"
    Image.fromarray(values.astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    expected = np.array([[0, 0, 0, 1], [128, 255, 7, 255]], dtype=np.uint8)
    assert np.array_equal(np.array(load_image(str(path), "L")), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoded_batches_reach_the_gpu_from_pinned_memory_without_a_host_wait(
    mixed_size_folder,
):
    """``decode: cpu`` + ``augment: gpu``: the loader pins each batch's packed pixels (its
    ``pin_memory`` step calls the batch's own), so copying them to the GPU queues the copy
    instead of waiting for it (CUDA's sync detector raises on a wait)."""
    data = ImageFolderDataModule(str(mixed_size_folder), augment="gpu", batch_size=4, num_workers=0)
    data.setup("fit")
    batch, labels = next(iter(data.train_dataloader()))
    assert isinstance(batch, ImageBatch) and batch.buffer.is_pinned() and labels.is_pinned()
    with gpu_waits_raise():
        decoded = batch.decode("cuda")
    for image, path in zip(decoded, batch.paths, strict=True):
        assert image.is_cuda
        assert (image.cpu().int() - pil_pixels(Path(path)).int()).abs().max() <= 2


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_cmyk_and_grayscale_jpegs_in_one_batch_decode_to_pils_rgb(tmp_path, device):
    """``decode: gpu`` hands nvJPEG a whole batch; CMYK JPEGs (print workflows, some stock
    photos) and grayscale ones must come out as the RGB PIL gives, whether the decoder reads
    them or the batch falls back to one image at a time, never in wrong colours."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    pixels[:, :16] = (200, 30, 90)  # a flat patch: colour errors show beyond IDCT rounding
    paths = []
    for mode in ("RGB", "CMYK", "L"):
        path = tmp_path / f"{mode}.jpg"
        Image.fromarray(pixels).convert(mode).save(path, quality=95)
        assert Image.open(path).mode == mode
        paths.append(path)
    batch = ImageBatch([read_encoded(str(p), decode=False) for p in paths])
    for image, path in zip(batch.decode(device), paths, strict=True):
        assert image.device.type == device and image.shape == (3, 24, 32)
        difference = (image.cpu().int() - pil_pixels(path).int()).abs()
        assert int(difference.max()) <= 8, path.name  # a few levels: another IDCT
