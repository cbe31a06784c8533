"""Which error of a chain the one-line report shows: the user error a wrapper was raised
``from``, never a user error that a later failure was raised while handling (that failure is
new: a bug keeps its traceback, a full disk is named); the message of an error re-raised from a
DataLoader worker without the worker's traceback; a full disk or unwritable folder named as the
file being saved."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.checkpoint import main as export_main
from simclr_lightning.checkpoint_io import atomic_save
from simclr_lightning.cli_errors import EXIT_FAILURE, EXIT_USAGE, report, user_error
from simclr_lightning.errors import CorruptImageError, SettingError, require
from tests.test_checkpoint import save_simclr_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def raised(make) -> BaseException:
    try:
        make()
    except BaseException as err:  # noqa: BLE001 - the test inspects whatever was raised
        return err
    raise AssertionError("nothing was raised")


def bad_setting() -> None:
    require(False, "model.temperature", -1.0, "> 0")


def test_a_wrapper_raised_from_a_user_error_reports_it():
    def wrapped():
        try:
            bad_setting()
        except SettingError as err:
            raise ValueError("Does not validate against any of the Union subtypes ...") from err

    assert user_error(raised(wrapped)) == (
        "model.temperature=-1.0 is invalid: must be > 0",
        EXIT_USAGE,
    )


def test_a_bug_while_handling_a_user_error_keeps_its_traceback(capsys):
    def buggy_handler():
        try:
            bad_setting()
        except SettingError:
            {}["a bug in the failure path"]

    err = raised(buggy_handler)
    assert isinstance(err, KeyError)
    assert user_error(err) is None
    assert report(err) is None
    assert capsys.readouterr().err == ""


def test_a_full_disk_while_handling_a_corrupt_image_names_both(tmp_path, monkeypatch):
    """A run stopped by a corrupt image saves a checkpoint first; the disk is full."""

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "checkpoints" / "last.ckpt"

    def stop_and_save():
        try:
            raise CorruptImageError("train/cat/1.jpg", "truncated")
        except CorruptImageError:
            atomic_save({"step": 3}, target)

    err = raised(stop_and_save)
    message, code = user_error(err)
    assert code == EXIT_FAILURE
    first, handled = message.split(" (raised while handling: ")
    assert first == f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '{target}'"
    assert handled.startswith("cannot decode image file 'train/cat/1.jpg' (truncated)")
    assert sorted(p.name for p in target.parent.iterdir()) == []  # no partial file left


def test_an_os_error_of_another_kind_is_a_bug():
    err = OSError(errno.EIO, os.strerror(errno.EIO))
    assert user_error(err) is None


class FailsInWorker(Dataset):
    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise self.error


@pytest.mark.parametrize(
    ("error", "code", "wanted"),
    [
        (SettingError("data.image_size=7 is invalid: must be >= 8"), EXIT_USAGE, None),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train/a.jpg"),
            EXIT_FAILURE,
            "[Errno 2] No such file or directory: '/data/train/a.jpg'",
        ),
    ],
    ids=["setting", "vanished-file"],
)
def test_an_error_from_a_dataloader_worker_is_its_own_message(error, code, wanted):
    """torch re-raises a worker's error as ``type(err)("Caught ... Original Traceback ...")``:
    the report is the error's own line, not the worker's traceback folded into one."""
    loader = DataLoader(FailsInWorker(error), batch_size=2, num_workers=1)
    err = raised(lambda: next(iter(loader)))
    assert type(err) is type(error)
    assert "Original Traceback" in str(err)  # what torch gave: the traceback in the message
    assert user_error(err) == (wanted or str(error), code)


def test_export_names_itself_and_an_output_it_cannot_write(tmp_path, capsys):
    ckpt = tmp_path / "simclr.ckpt"
    save_simclr_checkpoint(ckpt, cifar_stem=True, in_channels=1)
    (tmp_path / "a-file").write_text("not a folder")
    output = tmp_path / "a-file" / "sub" / "encoder.pt"
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(ckpt), str(output)])
    assert exit_info.value.code == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"simclr-lightning-export: error: [Errno {errno.ENOTDIR}] {os.strerror(errno.ENOTDIR)} "
        f"(saving {output}): '{tmp_path / 'a-file' / 'sub'}'"
    ]
