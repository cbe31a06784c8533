"""Checkpoints are never half written: a writer killed mid-save leaves the previous file whole
and no partial file at the destination (the next save deletes the one it left), the temporary
file lies in the destination's folder whatever TMPDIR is, and the CLI uses the plugin by
default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from torch import nn

from simclr_lightning import AtomicCheckpointIO
from simclr_lightning.checkpoint_io import STALE_AFTER_S, check_ckpt_path
from simclr_lightning.cli import add_atomic_checkpoint_io
from simclr_lightning.errors import CheckpointError
from tests.helpers import REPO

# Writes a 40 MB checkpoint through the plugin, slowly (each storage is written in chunks
# that sleep), so the parent can SIGKILL it mid-write.
WRITER = """
import sys, time, torch
from simclr_lightning import AtomicCheckpointIO
real_write = torch.serialization._open_zipfile_writer
class Slow:
    def __init__(self, opener): self.opener = opener
    def __getattr__(self, name): return getattr(self.writer, name)
    def __enter__(self): self.writer = self.opener.__enter__(); return self
    def __exit__(self, *a): return self.opener.__exit__(*a)
    def write_record(self, *a, **k):
        print("writing", flush=True); time.sleep(0.05); return self.writer.write_record(*a, **k)
torch.serialization._open_zipfile_writer = lambda f: Slow(real_write(f))
state = {f"w{i}": torch.full((100_000,), float(i)) for i in range(100)}
AtomicCheckpointIO().save_checkpoint({"state_dict": state}, sys.argv[1])
"""


def test_killed_writer_leaves_the_old_checkpoint_whole(tmp_path):
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    other_tmp = tmp_path / "elsewhere"  # TMPDIR on "another filesystem": must not be used
    other_tmp.mkdir()
    AtomicCheckpointIO().save_checkpoint({"step": 1}, ckpt)
    before = ckpt.read_bytes()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(ckpt)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(other_tmp)},
    )
    for _ in range(20):  # a fifth of the records written: the save is under way
        assert writer.stdout.readline() == "writing\n"
    partial = [p for p in ckpt.parent.iterdir() if p.name != "last.ckpt"]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the temp file, here
    assert partial[0].name.startswith(".partial-") and partial[0].suffix == ".tmp"
    assert list(other_tmp.iterdir()) == []
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert ckpt.read_bytes() == before
    assert AtomicCheckpointIO().load_checkpoint(ckpt) == {"step": 1}
    assert partial[0].name.startswith(f".partial-{socket.gethostname()}-{writer.pid}-")

    # The next save leaves a fresh one alone (its writer may be on a slow disk), then deletes
    # it once it is STALE_AFTER_S old; another host's and a live process's are kept.
    live = ckpt.parent / f".partial-{socket.gethostname()}-{os.getpid()}-abc123.tmp"
    elsewhere = ckpt.parent / f".partial-other-node-{writer.pid}-abc123.tmp"
    for other in (live, elsewhere):
        other.write_bytes(b"PK")
    AtomicCheckpointIO().save_checkpoint({"step": 2}, ckpt)
    assert partial[0].exists()
    old = time.time() - STALE_AFTER_S - 5
    for leftover in (partial[0], live, elsewhere):
        os.utime(leftover, (old, old))
    AtomicCheckpointIO().save_checkpoint({"step": 3}, ckpt)
    assert not partial[0].exists()
    assert live.exists() and elsewhere.exists()
    assert AtomicCheckpointIO().load_checkpoint(ckpt) == {"step": 3}


def test_a_killed_slurm_save_leaves_lightnings_resume_on_the_last_whole_checkpoint(tmp_path):
    """SLURM's SIGKILL can land mid-save. The requeued job resumes from the highest
    ``hpc_ckpt_<n>`` Lightning finds, reading the digits after "hpc_ckpt_" in every file name:
    a temporary file named after ``hpc_ckpt_2.ckpt`` made it look for checkpoint 2 or a
    number made of the random name's digits, which does not exist."""
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "hpc_ckpt_1.ckpt")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "hpc_ckpt_2.ckpt")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert len(list(tmp_path.iterdir())) == 2  # the whole checkpoint and the partial file
    newest = _CheckpointConnector._CheckpointConnector__max_ckpt_version_in_folder(
        tmp_path, "hpc_ckpt_"
    )  # what Lightning's SLURM resume picks
    assert newest == 1


def test_failed_write_removes_its_temp_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    ckpt = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, ckpt)
    real_save = torch.save

    def save_half(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # bytes reach the file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, ckpt)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(ckpt) == {"step": 1}
    io.save_checkpoint({"step": 2, "w": torch.arange(3)}, ckpt)  # and a whole save replaces it
    loaded = io.load_checkpoint(ckpt)
    assert loaded["step"] == 2 and loaded["w"].tolist() == [0, 1, 2]
    assert oct(ckpt.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_truncated_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"^ckpt_path='.*last\.ckpt' is truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(ckpt)


def test_cli_adds_the_plugin_unless_the_user_chose_a_checkpoint_io():
    from jsonargparse import Namespace

    trainer = Namespace(plugins=None)
    add_atomic_checkpoint_io(trainer)
    assert [p.class_path for p in trainer.plugins] == [
        "simclr_lightning.checkpoint_io.AtomicCheckpointIO"
    ]
    own = Namespace(class_path="lightning.fabric.plugins.TorchCheckpointIO", init_args=Namespace())
    trainer = Namespace(plugins=[own])
    add_atomic_checkpoint_io(trainer)
    assert trainer.plugins == [own]
    trainer = Namespace(plugins="bf16-mixed")  # a plugin that is not a CheckpointIO is kept
    add_atomic_checkpoint_io(trainer)
    assert trainer.plugins[0] == "bf16-mixed" and len(trainer.plugins) == 2


def test_cli_training_saves_through_the_plugin(tmp_path, monkeypatch):
    """A real CLI run writes its checkpoint through AtomicCheckpointIO."""
    from simclr_lightning.cli import cli_main

    saved: list[Path] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append(Path(path))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    cli = cli_main(
        ["fit", "--model=SimCLR", "--model.backbone=timm:test_resnet", "--model.cifar_stem=false",
         "--model.head_hidden_dim=8", "--model.head_output_dim=4", "--model.warmup_epochs=0",
         "--data=SampleDataModule", "--data.batch_size=4", "--data.num_workers=0",
         "--data.augmentation.image_size=16", "--trainer.accelerator=cpu",
         "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.max_steps=1",
         "--trainer.limit_val_batches=0", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert len(saved) == 1 and saved[0].is_file() and saved[0].parent.parent == tmp_path
    assert time.time() - saved[0].stat().st_mtime < 600


def _garbage(tmp_path: Path) -> dict[str, bytes]:
    whole = tmp_path / "whole.ckpt"
    torch.save({"w": torch.zeros(10)}, whole)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(10)}, legacy, _use_new_zipfile_serialization=False)
    blob = legacy.read_bytes()
    return {
        "text": b"hello\n",  # the weights-only unpickler: KeyError: 101
        "json": b'{"a": 1}\n',
        "3 bytes of a checkpoint": whole.read_bytes()[:3],
        "legacy format cut short": blob[: blob.index(b"_rebuild_tensor") + 5],  # a global's name
    }


@pytest.mark.parametrize(
    "kind", ["text", "json", "3 bytes of a checkpoint", "legacy format cut short"]
)
def test_a_file_that_is_no_checkpoint_is_named_as_corrupt(tmp_path, kind):
    ckpt = tmp_path / "bad.ckpt"
    ckpt.write_bytes(_garbage(tmp_path)[kind])
    with pytest.raises(CheckpointError) as failure:
        AtomicCheckpointIO().load_checkpoint(ckpt)
    message = str(failure.value)
    assert message.startswith(f"ckpt_path={str(ckpt)!r} is truncated or corrupt"), message
    assert "\n" not in message and "Weights only load failed" not in message


def test_a_whole_file_of_pickled_objects_says_what_it_holds(tmp_path):
    """A pickled module is a complete file the weights-only loader refuses: not 'corrupt'."""
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError) as failure:
        AtomicCheckpointIO().load_checkpoint(tmp_path / "module.pt")
    message = str(failure.value)
    assert "\n" not in message and "truncated" not in message
    assert "holds objects the weights-only loader refuses" in message
    assert "torch.nn.modules.linear.Linear" in message and "state_dict()" in message


def test_ckpt_path_check_reads_a_whole_legacy_format_checkpoint(tmp_path):
    """mmap reads only zip checkpoints: a whole legacy-format one is read without it."""
    checkpoint = {"state_dict": {"w": torch.zeros(2)}, "pytorch-lightning_version": "2.5.0"}
    checkpoint["optimizer_states"] = []
    torch.save(checkpoint, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    check_ckpt_path(tmp_path / "old.ckpt", "simclr_lightning.SimCLR", fit=True)  # no error


@pytest.mark.parametrize("fit", [False, True])
def test_ckpt_path_of_a_plain_state_dict_is_refused_before_lightning_reads_it(tmp_path, fit):
    """An exported encoder as --ckpt_path: Lightning fails on it with KeyError
    'pytorch-lightning_version'; in fit it is no save_weights_only checkpoint either."""
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError) as failure:
        check_ckpt_path(tmp_path / "encoder.pt", "simclr_lightning.SimCLR", fit=fit)
    message = str(failure.value)
    assert "is not a checkpoint Lightning wrote (a plain state dict" in message
    assert "--model.checkpoint" in message and "save_weights_only" not in message
