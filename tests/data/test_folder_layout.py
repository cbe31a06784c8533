"""What an image folder's layout means: hidden folders are no classes, a labelled subset keeps
its class names, and a task that needs labels refuses a folder without them before any work."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.data.class_names import dataset_class_names
from simclr_lightning.errors import SettingError
from simclr_lightning.evaluation.classify_data import classify_data


def write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def data(root: Path, **kwargs) -> ImageFolderDataModule:
    settings = dict(batch_size=2, num_workers=0, augmentation=SimCLRAugmentation(image_size=8))
    return ImageFolderDataModule(str(root), **(settings | kwargs))


@pytest.mark.parametrize("task", ["pretrain", "classify"])
def test_hidden_folders_are_not_classes(tmp_path, task):
    """Jupyter leaves ``.ipynb_checkpoints`` in folders it opened: torchvision's ImageFolder
    made it class 0 and moved every real class up by one. Reference: each file's label is
    its class folder's position among the visible folders."""
    for split in ("train", "val"):
        for i, name in enumerate(["cat", "dog", ".ipynb_checkpoints"]):
            write_images(tmp_path / split / name, 2, seed=i)
    dm = data(tmp_path, task=task)
    assert dm.num_classes == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "val has no folder for training class" warning
        dm.setup("fit")
    for dataset in (dm.train_set, dm.val_set):
        assert dataset.classes == ["cat", "dog"]
        assert len(dataset.samples) == 4
        for path, label in dataset.samples:
            assert label == ["cat", "dog"].index(Path(path).parent.name)


def test_hidden_files_and_folders_inside_a_split_hold_no_images(tmp_path):
    """Jupyter's ``cat/.ipynb_checkpoints/0-checkpoint.png`` copies were trained on twice and
    macOS's ``._0.png`` resource forks (not images) stopped the run as corrupt files, in class
    folders, in a folder of unlabelled images, and among ``ImageFilesDataModule``'s paths."""
    from simclr_lightning.data.image_files import list_images

    write_images(tmp_path / "labelled" / "train" / "cat", 2, seed=0)
    write_images(tmp_path / "unlabelled" / "train", 2, seed=1)
    for folder in (tmp_path / "labelled" / "train" / "cat", tmp_path / "unlabelled" / "train"):
        write_images(folder / ".ipynb_checkpoints", 2, seed=2)
        (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    wanted = {"0.png", "1.png"}
    labelled = data(tmp_path / "labelled")
    labelled.setup("fit")
    assert sorted(Path(p).relative_to(tmp_path) for p, _ in labelled.train_set.samples) == [
        Path("labelled/train/cat") / name for name in sorted(wanted)
    ]
    unlabelled = data(tmp_path / "unlabelled")
    unlabelled.setup("fit")
    assert {Path(f).name for f in unlabelled.train_set.files} == wanted
    assert len(unlabelled.train_set) == 2
    found = list_images(str(tmp_path / "unlabelled"))
    assert {Path(f).relative_to(tmp_path / "unlabelled").as_posix() for f in found} == {
        f"train/{name}" for name in wanted
    }
    for dataset in (labelled.train_set, unlabelled.train_set):
        for i in range(len(dataset)):
            dataset[i]  # every listed file decodes: no stop at a resource fork


def test_classify_on_images_without_class_folders_is_refused_before_reading(tmp_path):
    """Linear evaluation on a folder of unlabelled images trained on nothing (every label -1)
    and exited 0."""
    write_images(tmp_path / "train", 4, seed=0)
    with pytest.raises(SettingError, match=r"data.task=classify needs labelled images.*train/"):
        data(tmp_path, task="classify").setup("fit")
    data(tmp_path).setup("fit")  # pretraining on them is what they are for


def test_a_labelled_subset_keeps_the_class_names_for_the_class_count_check(tmp_path):
    """With ``label_fraction`` the training split is a Subset, without ``classes``: with no
    val/ the class-count check was skipped and the first step failed on a label out of range."""
    for i, name in enumerate(["bird", "cat", "dog"]):
        write_images(tmp_path / "train" / name, 4, seed=i)
    dm = data(tmp_path, task="classify", label_fraction=0.5)
    with pytest.warns(UserWarning, match="no validation"):
        dm.setup("fit")
    assert len(dm.train_set) == 6
    assert dataset_class_names(dm) == ["bird", "cat", "dog"]
    with pytest.raises(SettingError, match=r"model.num_classes=2 but the data has 3 classes"):
        classify_data(dm, 2, {})


@pytest.mark.parametrize(
    ("settings", "applies"),
    [
        (dict(decode="gpu"), False),
        (dict(resident=True, task="classify", augment="gpu"), False),
        (dict(decode="gpu", augment="gpu"), True),
    ],
)
def test_device_only_settings_say_when_they_do_not_apply(tmp_path, settings, applies):
    """decode and resident shape the device path only: with CPU views they did nothing, with
    no word of it."""
    write_images(tmp_path / "train" / "cat", 2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data(tmp_path, **settings)
    said = [str(w.message) for w in caught if "apply to views made on the device" in str(w.message)]
    assert len(said) == (0 if applies else 1), said


@pytest.mark.parametrize("split", ["train", "val"])
def test_images_beside_class_folders_are_refused(tmp_path, split):
    """train/{a,b}/ plus 5 loose train/*.png trained on 6 images of 2 classes, the loose ones
    dropped unseen."""
    for i, name in enumerate(["a", "b"]):
        write_images(tmp_path / "train" / name, 3, seed=i)
        write_images(tmp_path / "val" / name, 1, seed=i)
    write_images(tmp_path / split, 5, seed=5)
    (tmp_path / split / "._0.png").write_bytes(b"resource fork")  # hidden: not counted
    with pytest.raises(SettingError) as failure:
        data(tmp_path).setup("fit")
    message = str(failure.value)
    assert message.startswith(f"{tmp_path / split} holds 5 image(s) (e.g. 0.png) beside its ")
    assert "class folder(s) (a, b)" in message and "\n" not in message
    assert "inside class folders (labelled), or none (unlabeled" in message


def test_unlabeled_images_beside_a_subfolder_are_refused(tmp_path):
    """6 loose train/*.png and train/sub/*.png (2): only the 2 were used, as one class."""
    write_images(tmp_path / "train", 6, seed=0)
    write_images(tmp_path / "train" / "sub", 2, seed=1)
    with pytest.raises(SettingError, match=r"train holds 6 image\(s\) .*\(sub\).*move the sub"):
        data(tmp_path).setup("fit")
    (tmp_path / "train" / "sub" / "0.png").rename(tmp_path / "train" / "sub0.png")
    (tmp_path / "train" / "sub" / "1.png").rename(tmp_path / "train" / "sub1.png")
    (tmp_path / "train" / "sub").rmdir()
    dm = data(tmp_path)
    dm.setup("fit")
    assert len(dm.train_set) == 8 and dm.num_classes is None


def test_predict_paths_follow_symlinked_folders_and_keep_dangling_links(tmp_path):
    """rglob did not enter a symlinked folder (Python 3.11) and dropped a dangling link
    unnamed; training's ImageFolder follows the one and names the other as a bad file."""
    from simclr_lightning import CorruptImageError, CorruptImageWarning, ImageFilesDataModule
    from simclr_lightning.data.image_files import list_images

    write_images(tmp_path / "elsewhere", 2, seed=0)
    write_images(tmp_path / "photos" / "own", 1, seed=1)
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos" / "own" / "loop").symlink_to(tmp_path / "photos")  # a cycle
    (tmp_path / "photos" / "gone.png").symlink_to(tmp_path / "missing.png")
    found = list_images(str(tmp_path / "photos"))
    assert [Path(f).relative_to(tmp_path / "photos").as_posix() for f in found] == [
        "gone.png",
        "linked/0.png",
        "linked/1.png",
        "own/0.png",  # not own/loop/...: a link to a folder it is inside is not entered
    ]
    dm = ImageFilesDataModule([str(tmp_path / "photos")], image_size=8)
    with pytest.raises(CorruptImageError) as failure:
        list(dm.predict_dataloader())
    assert failure.value.path == str(tmp_path / "photos" / "gone.png")
    dm = ImageFilesDataModule([str(tmp_path / "photos")], image_size=8, skip_corrupt=True)
    with pytest.warns(CorruptImageWarning, match="gone.png"):
        paths = [p for _, batch in dm.predict_dataloader() for p in batch]
    assert len(paths) == 3 and not any(p.endswith("gone.png") for p in paths)


def test_training_samples_are_torchvisions_on_an_ordinary_tree(tmp_path):
    """The samples (files, their order, labels) of a tree with nested folders, a symlinked
    class folder and upper-case extensions are torchvision ImageFolder's own."""
    from torchvision.datasets import ImageFolder

    write_images(tmp_path / "train" / "cat", 3, seed=0)
    write_images(tmp_path / "train" / "cat" / "nested" / "deeper", 2, seed=1)
    write_images(tmp_path / "elsewhere", 2, seed=2)
    (tmp_path / "train" / "dog").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "train" / "cat" / "0.png").rename(tmp_path / "train" / "cat" / "0.PNG")
    dm = data(tmp_path)
    dm.setup("fit")
    assert dm.train_set.samples == ImageFolder(str(tmp_path / "train")).samples


def test_a_link_to_a_folder_above_is_not_walked_again(tmp_path):
    """``train/cat/up -> ..``: torchvision walked train/ again under cat/, about 40 levels
    deep, serving every dog image 40 times labelled cat. Reference: the real files, each
    labelled by its class folder."""
    write_images(tmp_path / "train" / "cat", 2, seed=0)
    write_images(tmp_path / "train" / "dog", 3, seed=1)
    (tmp_path / "train" / "cat" / "up").symlink_to("..")
    dm = data(tmp_path)
    dm.setup("fit")
    real = sorted((p.parent.name, p.name) for p in (tmp_path / "train").glob("*/*.png"))
    served = sorted((Path(f).parent.name, Path(f).name) for f, _ in dm.train_set.samples)
    assert served == real and len(served) == 5
    assert all(
        label == ["cat", "dog"].index(Path(f).parent.name) for f, label in dm.train_set.samples
    )


def test_a_training_class_with_no_images_is_refused_naming_what_it_holds(tmp_path):
    """A class of .gif (or .heic) files trained as a class with no images, silently:
    torchvision's own check was off (``allow_empty``, for val/'s missing classes)."""
    write_images(tmp_path / "train" / "cat", 2, seed=0)
    (tmp_path / "train" / "gifs").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "gifs" / f"{i}.gif")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as refused:
        data(tmp_path).setup("fit")
    message = str(refused.value)
    assert message.startswith(f"data.root: {tmp_path / 'train'}: class folder(s) empty, gifs hold")
    assert "they hold 3 .gif" in message and "\n" not in message


def test_a_held_out_class_folder_with_no_images_is_a_warning(tmp_path):
    for split in ("train", "val"):
        write_images(tmp_path / split / "cat", 2, seed=0)
        write_images(tmp_path / split / "dog", 2, seed=1)
    for path in (tmp_path / "val" / "cat").iterdir():
        path.unlink()
    dm = data(tmp_path)
    with pytest.warns(UserWarning, match=r"class folder\(s\) cat hold no images"):
        dm.setup("fit")
    assert [label for _, label in dm.val_set.samples] == [1, 1]  # dog keeps train/'s label


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_held_out_stages_without_val_are_refused(tmp_path, stage):
    """Lightning ran nothing and exited 0: predict wrote no file, test measured nothing. The
    stage as Lightning passes it (a TrainerFn) was said as "TrainerFn.VALIDATING"."""
    from lightning.pytorch.trainer.states import TrainerFn

    write_images(tmp_path / "train" / "cat", 2, seed=0)
    with pytest.raises(
        SettingError,
        match=f"has no val/ folder, the held-out images simclr-lightning {stage} reads",
    ) as refused:
        data(tmp_path).setup(TrainerFn(stage))
    assert ("ImageFilesDataModule" in str(refused.value)) == (stage == "predict")


def test_a_grayscale_folder_trains_a_one_channel_encoder(tmp_path):
    """data.channels=1: images read as PIL's luminance, normalised by ImageNet's statistics
    through the same weights (computed here from the published values), one channel from the
    loader to the encoder; the device views (RGB decoding) are refused."""
    import lightning as L

    from simclr_lightning import SimCLR
    from tests.helpers import quiet_trainer

    for split in ("train", "val"):
        for name, grey in (("cat", 40), ("dog", 200)):
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(4):
                rgb = np.full((8, 8, 3), (grey, grey + 10, grey - 20), np.uint8)
                Image.fromarray(rgb).save(tmp_path / split / name / f"{k}.png")
    dm = data(tmp_path, channels=1)
    dm.setup("fit")
    luma = (0.299, 0.587, 0.114)
    mean = sum(w * m for w, m in zip(luma, (0.485, 0.456, 0.406), strict=True))
    std = sum(w * s for w, s in zip(luma, (0.229, 0.224, 0.225), strict=True))
    image, label = dm.val_set[0]  # cat: (40, 50, 20) to the rounded luminance
    level = round(0.299 * 40 + 0.587 * 50 + 0.114 * 20)
    assert image.shape == (1, 8, 8) and label == 0
    expected = torch.full((1, 8, 8), (level / 255 - mean) / std)
    torch.testing.assert_close(image, expected, atol=2e-3, rtol=0)
    (x_a, x_b), _ = next(iter(dm.train_dataloader()))
    assert x_a.shape == x_b.shape == (2, 1, 8, 8)
    model = SimCLR(backbone="timm:test_resnet", cifar_stem=False, in_channels=1, head_hidden_dim=8,
                   head_output_dim=8, optimizer="sgd", base_lr=0.01, warmup_epochs=0)  # fmt: skip
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and isinstance(trainer, L.Trainer)
    with pytest.raises(SettingError, match="data.channels=1 makes its views on the CPU"):
        data(tmp_path, channels=1, augment="gpu")
    with pytest.raises(SettingError, match="data.channels=2 is invalid"):
        data(tmp_path, channels=2)


@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_a_classifier_refuses_a_val_split_without_labels(tmp_path, stage):
    """Loose images in val/ beside a labelled train/: labelled -1, they were all dropped from
    the metrics, so a fit trained a whole epoch before its checkpoint's val/top1 was missing
    and ``test`` exited 0 printing nothing. Pretraining and prediction read no val labels."""
    write_images(tmp_path / "train" / "cat", 2, seed=0)
    write_images(tmp_path / "train" / "dog", 2, seed=1)
    write_images(tmp_path / "val", 2, seed=2)
    with pytest.raises(SettingError, match=r"val/ has no class folders but train/ has \(cat, dog"):
        data(tmp_path, task="classify").setup(stage)
    data(tmp_path, task="classify").setup("predict")
    data(tmp_path, task="pretrain").setup(stage)


def test_images_in_formats_not_read_beside_read_ones_are_said(tmp_path):
    """A class folder of one JPEG and 3 GIFs trained on the JPEG alone, without a word (a
    folder of GIFs alone is an error naming them)."""
    write_images(tmp_path / "labelled" / "train" / "cat", 2, seed=0)
    write_images(tmp_path / "labelled" / "train" / "dog", 2, seed=1)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "labelled" / "train" / "dog" / f"{i}.gif")
    (tmp_path / "labelled" / "train" / "dog" / "notes.txt").write_text("not an image")
    write_images(tmp_path / "flat" / "train", 2, seed=2)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "train" / "x.heic", format="PNG")
    said = []
    for root, kinds in (("labelled", "3 .gif"), ("flat", "1 .heic")):
        with pytest.warns(UserWarning, match=r"image\(s\) in formats not read are left out") as w:
            data(tmp_path / root).setup("fit")
        said += [str(m.message) for m in w if "formats not read" in str(m.message)]
        assert f"({kinds}; read: .jpg, .jpeg, .png" in said[-1]
    assert said[0].startswith(f"{tmp_path / 'labelled' / 'train'}: 3 image(s)")
    assert said[1].startswith(f"{tmp_path / 'flat' / 'train'}: 1 image(s)")
    write_images(tmp_path / "clean" / "train" / "cat", 2, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data(tmp_path / "clean").setup("fit")
    assert not [w for w in caught if "formats not read" in str(w.message)]
