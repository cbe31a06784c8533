import gzip
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from simclr_lightning import (
    CIFARDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SimCLRAugmentation,
)
from simclr_lightning.data.encoded import ImageBatch
from simclr_lightning.errors import CorruptImageError, SettingError
from tests.helpers import quiet_trainer

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def small(aug_size: int = 32) -> dict:
    return dict(
        batch_size=8,
        num_workers=0,
        augmentation=SimCLRAugmentation(image_size=aug_size, blur_prob=0.0),
    )


def test_image_folder_serves_two_views_and_labels(cifar_tiny):
    dm = ImageFolderDataModule(str(cifar_tiny), **small())
    dm.setup("fit")
    assert dm.train_set.classes == CLASSES and len(dm.train_set) == 200 and len(dm.val_set) == 100
    (x_a, x_b), y = next(iter(dm.train_dataloader()))
    assert x_a.shape == x_b.shape == (8, 3, 32, 32) and x_a.dtype == torch.float32
    assert not torch.equal(x_a, x_b)  # two independent random views
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and len(set(y.tolist())) == 8  # classes interleaved


def test_image_folder_eval_view_is_the_normalised_image(cifar_tiny):
    dm = ImageFolderDataModule(str(cifar_tiny), **small())
    dm.setup("validate")
    path, label = dm.val_set.samples[0]
    x, y = dm.val_set[0]
    mean = torch.tensor(dm.augmentation.mean).view(3, 1, 1)
    std = torch.tensor(dm.augmentation.std).view(3, 1, 1)
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    torch.testing.assert_close((x * std + mean) * 255, pixels.float(), atol=1e-3, rtol=0)
    assert y == label


def test_unlabeled_folder_gets_label_minus_one(cifar_tiny, tmp_path):
    (tmp_path / "train").mkdir()
    for i, image in enumerate(sorted((cifar_tiny / "train" / "cat").iterdir())[:10]):
        (tmp_path / "train" / f"{i}.jpg").symlink_to(image.resolve())
    dm = ImageFolderDataModule(str(tmp_path), **small())
    with pytest.warns(UserWarning, match="no validation"):
        dm.setup("fit")
    _, y = next(iter(dm.train_dataloader()))
    assert y.tolist() == [-1] * 8
    assert dm.val_dataloader() == []


def test_corrupt_image_error_names_the_file(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    bad = tmp_path / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    dm = ImageFolderDataModule(str(tmp_path), **small())
    dm.train_set = dm.make_dataset("train", dm.eval_transform())
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        dm.train_set[0]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda root: ImageFolderDataModule(str(root / "nope")), "data.root"),
        (lambda root: ImageFolderDataModule(str(root)), "no train/"),
        (lambda root: CIFARDataModule(str(root), batch_size=1), "data.batch_size"),
        (lambda root: CIFARDataModule(str(root), dataset="svhn"), "data.dataset"),
        (lambda root: MNISTDataModule(str(root), num_workers=-1), "data.num_workers"),
    ],
)
def test_bad_data_settings_fail_fast(tmp_path, make, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make(tmp_path)


def test_batch_larger_than_the_shard_fails_before_training(cifar_tiny):
    dm = ImageFolderDataModule(str(cifar_tiny), batch_size=256, num_workers=0)
    with pytest.raises(ValueError, match="data.batch_size=256 is larger than the 200"):
        dm.setup("fit")


def test_fashion_mnist_from_the_original_idx_files(fashion_mnist_dir, tmp_path):
    dm = MNISTDataModule(str(fashion_mnist_dir), dataset="fashion_mnist", **small(28))
    dm.setup("fit")
    assert len(dm.train_set) == 60000 and len(dm.val_set) == 10000
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert torch.bincount(dm.train_set.labels).tolist() == [6000] * 10
    assert torch.bincount(dm.val_set.labels).tolist() == [1000] * 10
    # Independent reader: torchvision's parser on the decompressed file.
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress((fashion_mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()))
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(
        gzip.decompress((fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    )
    torch.testing.assert_close(dm.val_set.images[:, 0], read_image_file(str(raw)))
    torch.testing.assert_close(dm.val_set.labels, read_label_file(str(labels)).long())
    (x_a, x_b), _ = next(iter(dm.train_dataloader()))
    assert x_a.shape == (8, 1, 28, 28)
    x, _ = dm.val_set[0]
    expected = (read_image_file(str(raw))[0].float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[0], expected, atol=1e-5, rtol=0)
    # predictions name the classes of the dataset's label table (Zalando's README), not 0-9
    from simclr_lightning.data.class_names import dataset_class_names

    assert dataset_class_names(dm) == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's idx format: 2 zero bytes, 0x08 (uint8), the rank, big-endian int32 sizes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_and_fashion_mnist_files_are_not_taken_for_each_other(fashion_mnist_dir, tmp_path):
    """The two datasets' files have the same names: MNIST digits under the default
    data.dataset=fashion_mnist were normalised and named as clothes, in silence."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):  # digit-like: 13% of pixels lit (0.131)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte",
                  255 * (rng.random((n, 28, 28)) < 0.131))  # fmt: skip
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    with pytest.raises(SettingError, match=(
        rf"^data.data_dir={str(tmp_path)!r} holds mnist, not data.dataset='fashion_mnist': "
        r"the mean pixel of train-images-idx3-ubyte is 0.13\d of 255, mnist's 0.131; set "
        r"data.dataset=mnist$"
    )):  # fmt: skip
        MNISTDataModule(str(tmp_path), **small(28)).setup("fit")
    digits = MNISTDataModule(str(tmp_path), dataset="mnist", **small(28))
    digits.setup("fit")
    assert len(digits.train_set) == 60
    with pytest.raises(SettingError, match=r"holds fashion_mnist, not data.dataset='mnist'"):
        MNISTDataModule(str(fashion_mnist_dir), dataset="mnist", **small(28)).setup("fit")


def test_mnist_missing_files_say_where_to_put_them(tmp_path):
    dm = MNISTDataModule(str(tmp_path), **small(28))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        dm.setup("fit")


def write_cifar_dir(jpg_root: Path, data_dir: Path, per_batch: int) -> list[tuple[Path, int]]:
    """torchvision's CIFAR-10 python format, written from the JPEG copy."""
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    written = []
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(files):
        split = "val" if name == "test_batch" else "train"
        rows, labels = [], []
        for i in range(per_batch):
            label = (b + i) % 10
            path = sorted((jpg_root / split / CLASSES[label]).iterdir())[b * per_batch + i]
            rows.append(np.array(Image.open(path).convert("RGB")).transpose(2, 0, 1).reshape(-1))
            labels.append(label)
            written.append((path, label))
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.stack(rows), "labels": labels}, f)
    return written


def test_cifar_reads_the_torchvision_format_offline(cifar_jpg_root, tmp_path, monkeypatch):
    written = write_cifar_dir(cifar_jpg_root, tmp_path, per_batch=4)
    # Our files are real CIFAR-10 images but not the original archive: only the md5 differs.
    monkeypatch.setattr(
        datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file()
    )
    dm = CIFARDataModule(str(tmp_path), download=False, batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 4
    mean = torch.tensor(dm.augmentation.mean).view(3, 1, 1)
    std = torch.tensor(dm.augmentation.std).view(3, 1, 1)
    for index, (path, label) in enumerate(written[20:]):
        x, y = dm.val_set[index]
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        torch.testing.assert_close((x * std + mean) * 255, pixels.float(), atol=1e-3, rtol=0)
        assert y == label
    (x_a, x_b), y = next(iter(dm.train_dataloader()))
    assert x_a.shape == (4, 3, 32, 32)


def test_cifar_offline_errors_say_what_to_do(tmp_path, monkeypatch):
    dm = CIFARDataModule(str(tmp_path), download=False, num_workers=0)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*configs/imagefolder.yaml"):
        dm.setup("fit")

    def no_network(self):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(datasets.CIFAR10, "download", no_network)
    dm = CIFARDataModule(str(tmp_path), download=True, num_workers=0)
    with pytest.raises(FileNotFoundError, match="data.data_dir.*download failed.*imagefolder"):
        dm.prepare_data()


def fit_one_step_and_grab_batch(dm, precision: str = "32-true") -> tuple:
    import lightning as L

    from simclr_lightning import SimCLR

    seen = {}

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["batch"] = batch  # after on_after_batch_transfer

    model = SimCLR(head_hidden_dim=16, head_output_dim=8)
    trainer = quiet_trainer(
        max_steps=1,
        limit_val_batches=0,
        callbacks=[Grab()],
        precision=precision,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 1
    return seen["batch"]


def test_gpu_augment_path_makes_views_after_transfer(cifar_tiny):
    dm = ImageFolderDataModule(str(cifar_tiny), augment="gpu", **small())
    dm.setup("fit")
    raw, labels = next(iter(dm.train_dataloader()))
    assert isinstance(raw, ImageBatch) and len(raw) == 8  # workers only decode
    assert all(im.decoded and im.data.dtype == torch.uint8 for im in raw.images)
    (x_a, x_b), y = fit_one_step_and_grab_batch(dm)
    assert x_a.shape == x_b.shape == (8, 3, 32, 32) and x_a.dtype == torch.float32
    assert not torch.equal(x_a, x_b)
    assert y.dtype == torch.int64


def test_gpu_views_take_a_true_precisions_dtype(cifar_tiny):
    """Lightning casts a batch to a ``*-true`` precision's dtype before the transfer, while it
    is still uint8 images: the views made after it must be cast too (the step raised a dtype
    mismatch)."""
    dm = ImageFolderDataModule(str(cifar_tiny), augment="gpu", **small())
    (x_a, x_b), y = fit_one_step_and_grab_batch(dm, precision="64-true")
    assert x_a.dtype == x_b.dtype == torch.float64 and y.dtype == torch.int64


def test_resident_cifar_draws_images_by_index(cifar_jpg_root, tmp_path, monkeypatch):
    written = write_cifar_dir(cifar_jpg_root, tmp_path, per_batch=4)
    monkeypatch.setattr(
        datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file()
    )
    dm = CIFARDataModule(str(tmp_path), download=False, augment="gpu", batch_size=4, num_workers=0)
    dm.setup("fit")
    indices = next(iter(dm.train_dataloader()))
    assert indices.dtype == torch.int64 and indices.shape == (4,)
    images, labels = dm.device_store.gather(indices)
    for i, image, label in zip(indices.tolist(), images, labels, strict=True):
        path, expected_label = written[i]
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(image, pixels) and int(label) == expected_label
    (x_a, x_b), y = fit_one_step_and_grab_batch(dm)
    assert x_a.shape == (4, 3, 32, 32) and not torch.equal(x_a, x_b)


def test_gpu_views_differ_across_ranks_after_seed_everything(cifar_tiny):
    """Every DDP rank seeds the same default generators; the device augmentation must still
    draw different crops and jitter on each rank, and the same ones again for the same rank."""
    from types import SimpleNamespace

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8)

    def views_on(rank: int) -> torch.Tensor:
        torch.manual_seed(0)  # what seed_everything does in every process
        dm = ImageFolderDataModule(str(cifar_tiny), augment="gpu", **small())
        device = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=device)
        dm.setup("fit")
        (x_a, x_b), _ = dm.device_views((images, labels))
        return torch.cat([x_a, x_b])

    rank0, rank1 = views_on(0), views_on(1)
    assert torch.equal(rank0, views_on(0))
    per_image_equal = (rank0 == rank1).flatten(1).all(dim=1)
    assert not per_image_equal.any()


def test_data_modules_say_how_many_classes(cifar_tiny, tmp_path):
    assert ImageFolderDataModule(str(cifar_tiny), **small()).num_classes == len(CLASSES)
    assert CIFARDataModule(str(tmp_path), dataset="cifar100", download=False).num_classes == 100
    assert CIFARDataModule(str(tmp_path), download=False).num_classes == 10
    assert MNISTDataModule(str(tmp_path)).num_classes == 10
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "a.jpg").write_bytes(b"")
    assert ImageFolderDataModule(str(tmp_path / "flat"), **small()).num_classes is None


def test_loader_workers_follow_the_machine_and_are_said(cifar_tiny, monkeypatch, caplog):
    """The README promises the chosen count in the log, once, as for precision."""
    import os

    from simclr_lightning.data import loaders

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(loaders, "_SAID_WORKERS", set())
    auto = ImageFolderDataModule(str(cifar_tiny), batch_size=8)
    with caplog.at_level("INFO"):
        assert auto.workers == 5  # Lightning's suggestion: cores - 1 for one device
        assert auto.workers == 5
    said = [r.getMessage() for r in caplog.records if "data.num_workers=" in r.getMessage()]
    assert said == [
        "simclr-lightning: data.num_workers=5 (cores per device minus one, at most 16); "
        "set --data.num_workers to choose"
    ]
    trainer = quiet_trainer(devices=2, strategy="ddp_spawn")
    auto.trainer = trainer
    assert auto.workers == 2  # 6 cores / 2 devices - 1
    caplog.clear()
    with caplog.at_level("INFO"):
        assert ImageFolderDataModule(str(cifar_tiny), batch_size=8, num_workers=3).workers == 3
    assert "data.num_workers" not in caplog.text  # set by the user: nothing to say


def test_predicting_with_a_grayscale_models_preprocessing_serves_one_channel(
    fashion_mnist_dir, tmp_path
):
    """A Fashion-MNIST model records one mean and std: the files to predict on are read as
    grayscale, so the batch has the one channel the model takes (three channels broadcast
    against the one mean silently, then fail in the model's first conv)."""
    from types import SimpleNamespace

    from simclr_lightning import ImageFilesDataModule

    raw = gzip.decompress((fashion_mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k").write_bytes(raw)
    digits = read_image_file(str(tmp_path / "t10k"))[:3]  # torchvision's own idx parser
    for i, digit in enumerate(digits):
        Image.fromarray(digit.numpy()).save(tmp_path / f"{i}.png")
    expected = (digits[:, None].float() / 255 - 0.2860) / 0.3530
    recorded = {"image_size": 28, "mean": [0.2860], "std": [0.3530], "resize_ratio": 1.0}

    dm = ImageFilesDataModule(str(tmp_path), batch_size=3)
    model = SimpleNamespace(preprocessing=recorded)
    dm.trainer = SimpleNamespace(lightning_module=model, world_size=1)
    images, paths = next(iter(dm.predict_dataloader()))
    assert [Path(p).name for p in paths] == ["0.png", "1.png", "2.png"]
    assert images.shape == (3, 1, 28, 28)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)

    rgb = ImageFilesDataModule(str(tmp_path), batch_size=3, image_size=28, resize_ratio=1.0)
    images, _ = next(iter(rgb.predict_dataloader()))  # an RGB model (ImageNet statistics)
    assert images.shape == (3, 3, 28, 28)
    one_value = r"data.std=\(0.5, 0.5\) is invalid: must be 1 value\(s\), as data.mean"
    with pytest.raises(ValueError, match=one_value):
        ImageFilesDataModule(str(tmp_path), mean=(0.5,), std=(0.5, 0.5)).predict_dataloader()


def test_augmentation_none_from_python_means_the_datas_own_views(cifar_tiny, tmp_path):
    """``augmentation=None`` (Python) gave every data module the base 32 px CIFAR views: an
    ImageNet folder then trained on 32 px crops without blur."""
    from simclr_lightning import SampleDataModule

    folder = ImageFolderDataModule(str(cifar_tiny), augmentation=None, batch_size=8)
    views = folder.augmentation  # the paper's ImageNet views
    assert (views.image_size, views.jitter_strength, views.blur_prob) == (224, 1.0, 0.5)
    mnist = MNISTDataModule(data_dir=str(tmp_path), augmentation=None, batch_size=8)
    assert mnist.augmentation.image_size == 28
    cifar = CIFARDataModule(data_dir=str(tmp_path), augmentation=None, batch_size=8)
    assert (cifar.augmentation.image_size, cifar.augmentation.jitter_strength) == (32, 0.5)
    sample = SampleDataModule(augmentation=None, batch_size=8)
    assert sample.augmentation.crop_scale == (0.2, 1.0)
