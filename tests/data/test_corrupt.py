"""Bad image files (a truncated JPEG, an empty file, a text file named .jpg) among real CIFAR-10
photographs: named in a one-line CorruptImageError (through loader workers too), skipped with
one warning each under ``skip_corrupt``, all listed up front under ``verify``."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from simclr_lightning import (
    CorruptFilesError,
    CorruptImageError,
    CorruptImageWarning,
    ImageFilesDataModule,
    ImageFolderDataModule,
    SimCLR,
    SimCLRAugmentation,
)
from simclr_lightning.cli import cli_main
from simclr_lightning.data.encoded import ImageBatch, read_encoded
from tests.ddp_helpers import run_ddp_script
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PER_CLASS = 6
TINY = SimCLRAugmentation(image_size=16, blur_prob=0.0)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def bad_folder(cifar_jpg_root, tmp_path_factory) -> tuple[Path, list[Path]]:
    """train/{cat,dog}: 6 real JPEGs each plus 3 bad files; val/{cat,dog}: 2 real JPEGs each."""
    root = tmp_path_factory.mktemp("bad_folder")
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for src in sorted((cifar_jpg_root / split / name).iterdir())[:count]:
                shutil.copy(src, root / split / name / src.name)
    real = sorted((root / "train" / "cat").iterdir())[0].read_bytes()
    bad = [root / "train" / "cat" / "truncated.jpg", root / "train" / "dog" / "empty.jpg"]
    bad.append(root / "train" / "dog" / "notes.jpg")
    bad[0].write_bytes(real[: len(real) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image, just some notes\n")
    return root, bad


def data(root: Path, **kwargs) -> ImageFolderDataModule:
    args = dict(batch_size=4, num_workers=0, augmentation=TINY, pin_memory=False)
    return ImageFolderDataModule(str(root), **(args | kwargs))


def drain(loader) -> list:
    return [batch for batch in loader]


def test_each_kind_of_bad_file_is_named_with_its_reason(bad_folder):
    root, bad = bad_folder
    dataset = data(root).make_dataset("train", None)
    reasons = {}
    for path in bad:
        index = [p for p, _ in dataset.samples].index(str(path))
        with pytest.raises(CorruptImageError) as failure:
            dataset[index]
        assert failure.value.path == str(path) and "\n" not in str(failure.value)
        reasons[path.name] = failure.value.reason
    assert reasons["empty.jpg"] == "empty file"
    assert "truncated" in reasons["truncated.jpg"].lower()


def test_an_image_over_pils_pixel_limit_is_called_large_not_damaged(tmp_path, monkeypatch):
    """PIL refuses images over Image.MAX_IMAGE_PIXELS x 2 (a 14000 x 13000 photo): the error
    read as a damaged file, and said nothing of the limit nor of the GPU path's decoder."""
    from PIL import Image

    from simclr_lightning.data.corrupt import load_rgb

    path = tmp_path / "large.png"
    Image.new("RGB", (30, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 600 pixels: over twice the limit
    with pytest.raises(CorruptImageError) as failure:
        load_rgb(str(path))
    reason = failure.value.reason
    assert reason.startswith("larger than PIL's decompression-bomb limit, not damaged (Image ")
    assert reason.endswith("raise PIL.Image.MAX_IMAGE_PIXELS (data.augment=gpu decodes it "
                           "without the limit)")  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_without_skip_the_loader_raises_the_error_naming_the_file(bad_folder, workers):
    root, bad = bad_folder
    dm = data(root, num_workers=workers, persistent_workers=False)
    dm.setup("fit")
    with pytest.raises(CorruptImageError) as failure:
        drain(dm.train_dataloader())
    err = failure.value  # the class survives torch's re-raise from a worker, message intact
    assert type(err) is CorruptImageError and err.path in map(str, bad)
    assert str(err).startswith(f"cannot decode image file {err.path!r} (")
    assert "\n" not in str(err) and "data.skip_corrupt=true" in str(err)


def test_skip_serves_full_batches_of_good_images_warning_once_per_file(bad_folder):
    root, bad = bad_folder
    good = [p for p in sorted((root / "train").rglob("*.jpg")) if p not in bad]
    torch.manual_seed(0)
    dm = data(root, skip_corrupt=True, drop_last=False, batch_size=5)
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second pass meets the same files: no new warning
            sizes = [len(labels) for (_, _), labels in dm.train_dataloader()]
            assert sizes == [5, 5, 5]  # 15 files: every batch full despite 3 bad
    skipped = [str(w.message) for w in caught if w.category is CorruptImageWarning]
    assert len(skipped) == 3
    assert sorted(m.split("'")[1] for m in skipped) == sorted(map(str, bad))

    # the image served in a bad file's place is one of the good files, and the same one
    # whatever the RNG state (a resumed run draws the same)
    plain = data(root, skip_corrupt=True).make_dataset("train", np.asarray)
    files = [Path(p) for p, _ in plain.samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        for path in bad:
            i = files.index(path)
            torch.manual_seed(1)
            served, _ = plain[i]
            torch.manual_seed(2)
            again, _ = data(root, skip_corrupt=True).make_dataset("train", np.asarray)[i]
            matches = [g for g in good if np.array_equal(pixels(g), served)]
            assert len(matches) == 1 and np.array_equal(served, again)


def test_skip_with_workers_warns_once_per_file_in_the_training_process(bad_folder):
    root, bad = bad_folder
    model = SimCLR(backbone="resnet18", head_hidden_dim=32, head_output_dim=16)
    dm = data(root, skip_corrupt=True, num_workers=2, persistent_workers=True)
    sizes = BatchSizes()
    trainer = quiet_trainer(
        max_epochs=3, limit_val_batches=0, precision="32-true", callbacks=[sizes]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm)
    assert sizes.sizes == [4] * 9  # 3 full batches in each of 3 epochs
    skipped = [str(w.message) for w in caught if w.category is CorruptImageWarning]
    assert sorted(m.split("'")[1] for m in skipped) == sorted(map(str, bad))


def test_report_with_nothing_new_does_not_scan_every_file():
    """report() runs on every batch, on the thread that trains: with no file newly found bad
    it reads one shared flag, not one per file (a ~10 ms scan a batch at ImageNet's size)."""
    from simclr_lightning.data.corrupt import SkipCorrupt
    from tests.data.test_encoded import LargestOutput

    skip = SkipCorrupt([f"{i}.jpg" for i in range(100_000)])
    skip.flags[7] = skip.REPORTED  # found and named already
    with LargestOutput() as seen:
        skip.report()
    assert seen.most <= 1
    # a flag whose "unreported" this process has not seen (a weakly ordered CPU): named by
    # the scan at the end of a stage (teardown), never lost
    skip.flags[9] = skip.FOUND
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skip.report()
        assert not caught
        skip.report(force=True)
    assert ["9.jpg" in str(w.message) for w in caught] == [True]


class BatchSizes(L.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(len(batch[1]))


def test_skip_gives_up_with_a_clear_error_when_almost_everything_is_bad(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i:02d}.jpg").write_bytes(b"")
    dataset = data(tmp_path, skip_corrupt=True).make_dataset("train", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        with pytest.raises(CorruptImageError, match="data.skip_corrupt gave up"):
            dataset[0]


def test_verify_lists_exactly_the_bad_files_before_training(
    bad_folder, cifar_tiny, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # without a trainer, the full list is written here
    root, bad = bad_folder
    with pytest.raises(CorruptFilesError) as failure:
        data(root, verify=True, num_workers=2).setup("fit")
    err = failure.value
    assert sorted(path for path, _ in err.bad) == sorted(map(str, bad))
    assert "found 3 of 19 image files undecodable" in str(err) and "\n" not in str(err)
    assert all(repr(str(p)) in str(err) for p in bad)
    assert isinstance(err, CorruptImageError)  # a run stopped by it is handled as one

    data(cifar_tiny, verify=True).setup("fit")  # a clean folder passes

    many = tmp_path / "many"
    (many / "train").mkdir(parents=True)
    for i in range(25):
        (many / "train" / f"{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(CorruptFilesError) as failure:
        data(many, verify=True).setup("fit")
    listing = Path(failure.value.listing)
    assert listing == tmp_path / "corrupt_files.txt"
    assert "and 5 more" in str(failure.value) and str(listing) in str(failure.value)
    assert len(listing.read_text().splitlines()) == 25


def test_device_decode_path_checks_files_in_the_workers(bad_folder, tmp_path):
    root, bad = bad_folder
    gpu = dict(augment="gpu", decode="gpu", persistent_workers=False)
    dm = data(root, **gpu)
    dm.setup("fit")
    with pytest.raises(CorruptImageError) as failure:
        drain(dm.train_dataloader())
    assert failure.value.path in map(str, bad)

    dm = data(root, skip_corrupt=True, num_workers=2, **gpu)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        batches = drain(dm.train_dataloader())
    assert [len(b) for b, _ in batches] == [4, 4, 4]
    assert not set(p for b, _ in batches for p in b.paths) & set(map(str, bad))
    assert all(image.shape == (3, 32, 32) for b, _ in batches for image in b.decode("cpu"))

    # resident: the bad files' rows are left out of the store
    dm = data(root, skip_corrupt=True, **gpu | dict(decode="cpu", resident=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        dm.setup("fit")
    assert len(dm.device_store) == 2 * PER_CLASS

    # markers intact, data damaged: caught when the batch is decoded, still named
    real = bytearray(sorted((root / "train" / "cat").iterdir())[0].read_bytes())
    real[2:-2] = bytes(len(real) - 4)
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(bytes(real))
    with pytest.raises(CorruptImageError) as failure:
        ImageBatch([read_encoded(str(damaged), decode=False)]).decode("cpu")
    assert failure.value.path == str(damaged)


def test_predict_files_skip_leaves_the_bad_ones_out(bad_folder):
    root, bad = bad_folder
    dm = ImageFilesDataModule([str(root / "train")], batch_size=4, image_size=16)
    with pytest.raises(CorruptImageError):
        drain(dm.predict_dataloader())
    dm = ImageFilesDataModule([str(root / "train")], batch_size=4, image_size=16, skip_corrupt=True)
    with pytest.warns(CorruptImageWarning) as caught:
        paths = [p for _, batch_paths in dm.predict_dataloader() for p in batch_paths]
    assert len(caught) == 3 and sorted(paths) == sorted(
        str(p) for p in (root / "train").rglob("*.jpg") if p not in bad
    )
    with pytest.raises(CorruptFilesError) as failure:
        ImageFilesDataModule([str(root / "train")], verify=True).setup("predict")
    assert sorted(p for p, _ in failure.value.bad) == sorted(map(str, bad))


def test_cli_fit_with_skip_corrupt_runs_to_the_end(bad_folder, tmp_path):
    root, _ = bad_folder
    args = [
        "fit",
        "--model=simclr_lightning.SimCLR",
        "--model.backbone=resnet18",
        "--model.head_hidden_dim=32",
        "--model.head_output_dim=16",
        "--data=simclr_lightning.ImageFolderDataModule",
        f"--data.root={root}",
        "--data.skip_corrupt=true",
        "--data.batch_size=5",
        "--data.num_workers=0",
        "--data.augmentation.image_size=16",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        "--trainer.max_epochs=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.warns(CorruptImageWarning):
        cli = cli_main(args)
    assert cli.trainer.global_step == 6 and not cli.trainer.interrupted


def test_verify_under_ddp_shares_the_files_and_every_rank_names_all(bad_folder, tmp_path):
    """Two processes of Lightning's DDP: each decodes its own half of the files, and both
    raise the one error listing all three bad files."""
    root, bad = bad_folder
    ranks = run_ddp_script("ddp_verify_script.py", 2, tmp_path / "out", "--root", str(root))
    assert [r["world"] for r in ranks] == [2, 2]
    shares = [set(r["decoded"]) for r in ranks]
    assert not shares[0] & shares[1]  # nothing decoded twice
    everything = {str(p) for p in root.rglob("*.jpg")}
    assert shares[0] | shares[1] == everything and len(everything) == 19
    assert sum(len(r["decoded"]) for r in ranks) == 19
    for r in ranks:
        assert r["error"] is not None
        assert sorted(path for path, _ in r["error"]["bad"]) == sorted(map(str, bad))
        assert "found 3 of 19 image files undecodable" in r["error"]["message"]
    assert ranks[0]["error"]["message"] == ranks[1]["error"]["message"]


def test_files_the_knn_bank_skips_in_workers_are_named_once(bad_folder):
    """The kNN bank reads the training files through its own loader (workers' warnings are
    lost): its finds are named in the training process, once, also when training meets them.
    The bank leaves them out: a substitute would add another image to it a second time."""
    root, bad = bad_folder
    dm = data(root, skip_corrupt=True, num_workers=2, persistent_workers=False)
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = sum(len(labels) for _, labels in dm.eval_train_dataloader())
        dm.report_skipped()  # what the next training batch (or teardown) does
        after_bank = [str(w.message) for w in caught if w.category is CorruptImageWarning]
        drain(dm.train_dataloader())
        dm.teardown("fit")
    assert rows == 2 * PER_CLASS  # the good files only
    assert sorted(m.split("'")[1] for m in after_bank) == sorted(map(str, bad))
    assert all("left out" in m for m in after_bank)
    skipped = [str(w.message) for w in caught if w.category is CorruptImageWarning]
    assert len(skipped) == 3  # training met the same files: no second warning


@pytest.mark.slow
def test_a_file_only_the_device_decoder_finds_bad_stops_every_ddp_rank_at_one_step(
    cifar_jpg_root, tmp_path
):
    """``decode: gpu`` under 2-process DDP (the device is the CPU here): rank 1's third batch
    holds a file whose JPEG markers pass the workers' check and that no decoder reads, so it
    turns out bad only when the batch is decoded, after the transfer. Both ranks still stop
    before step 3 with one line naming it, and last.ckpt holds step 2, as on the CPU path
    (tests/test_corrupt_ddp.py), instead of rank 1 raising alone."""
    import yaml
    from torchvision.datasets import ImageFolder

    from simclr_lightning.data.sampler import ResumableSampler
    from tests.helpers import make_subset
    from tests.preemption_runs import (
        assert_stopped_on,
        cli,
        global_step,
        steps_logged,
        write_config,
    )

    root = make_subset(cifar_jpg_root, tmp_path / "data", 2, 1)
    files = [Path(path) for path, _ in ImageFolder(str(root / "train")).samples]
    sampler = ResumableSampler(len(files), num_replicas=2, rank=1, seed=3)  # the config's seed
    sampler.set_epoch(0)
    bad = files[[i for i, _ in sampler][6]]  # rank 1, batch 3 (batches of 3)
    bad.unlink()  # a symlink to the real file
    bad.write_bytes(b"\xff\xd8" + b"\x00garbage" * 50 + b"\xff\xd9")  # markers intact
    assert not read_encoded(str(bad), decode=False).decoded  # left to the device's decoder

    work = tmp_path / "run"
    work.mkdir()
    config = write_config(root, work)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"] |= {"devices": 2, "strategy": "ddp"}
    settings["data"]["init_args"] |= {"augment": "gpu", "decode": "gpu"}
    config.write_text(yaml.safe_dump(settings))
    proc = cli(config)
    out = proc.communicate(timeout=300)[0].decode()
    assert_stopped_on(bad, proc.returncode, out)
    assert steps_logged(work) == [1, 1, 2, 2], out[-3000:]  # both ranks, steps 1 and 2
    assert global_step(work / "ckpts" / "last.ckpt") == 2


def test_a_trainers_predict_over_files_with_skip_corrupt_leaves_the_bad_ones_out(bad_folder):
    """Under trainer.predict the data module is set up in inference mode: the skipped-file
    flags were inference tensors, and the stage's closing warnings (in teardown, outside it)
    failed with "Inplace update to inference tensor outside InferenceMode"."""
    from simclr_lightning import SimCLR
    from tests.helpers import quiet_trainer

    root, bad = bad_folder
    dm = ImageFilesDataModule(
        [str(root / "train")], batch_size=4, image_size=16, skip_corrupt=True, num_workers=0
    )
    model = SimCLR(
        backbone="timm:test_resnet", cifar_stem=False, head_hidden_dim=8, head_output_dim=8
    )
    with pytest.warns(CorruptImageWarning) as caught:
        out = quiet_trainer().predict(model, datamodule=dm)
    assert sum(len(features) for features in out) == 2 * PER_CLASS
    named = [str(w.message) for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert sorted(text.split("'")[1] for text in named) == sorted(map(str, bad))
