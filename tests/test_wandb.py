"""configs/wandb.yaml in offline mode: the run's files hold the metrics, the plot and the model."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

from simclr_lightning.cli import cli_main
from tests.helpers import REPO

CONFIGS = REPO / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


def read_wandb_records(path: Path):
    """The protobuf records of a ``run-*.wandb`` file: W&B's LevelDB-style log (7-byte file
    header, 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run file once W&B has written its exit record: its writer process can
    still be appending after ``wandb.finish()`` returns (seen in full suite runs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(read_wandb_records(path))
        except Exception:  # a record still being written: read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_offline_wandb_run_holds_metrics_plot_and_model(cifar_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "unused"))  # save_dir wins, as documented
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    cli = cli_main(
        [
            "fit",
            "--seed_everything=0",
            "--model=simclr_lightning.SimCLR",
            "--model.cifar_stem=false",
            "--model.head_hidden_dim=64",
            "--model.optimizer=sgd",
            "--model.warmup_epochs=0",
            "--data=simclr_lightning.ImageFolderDataModule",
            f"--data.root={cifar_tiny}",
            "--data.augmentation.image_size=32",
            "--data.batch_size=20",
            "--data.num_workers=0",
            f"--config={CONFIGS / 'wandb.yaml'}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.name=offline-test",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=3",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=simclr_lightning.OnlineLinearProbe",
            "--trainer.callbacks.num_classes=10",
            "--trainer.callbacks+=simclr_lightning.EmbeddingPlot",
        ]
    )
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.logger.experiment.name == "offline-test"
    wandb.finish()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert not (tmp_path / "unused").exists()
    (log,) = run_dir.glob("run-*.wandb")
    history, artifacts, names, kinds, config = {}, [], set(), set(), {}
    for record in finished_records(log):
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(item.value_json)
        elif kind == "artifact":
            artifacts.append(record.artifact.type)
        elif kind == "run":
            names.add(record.run.display_name)
            for item in record.run.config.update:
                config[item.key or "/".join(item.nested_key)] = item.value_json
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = item.value_json
    # the run record can reach the file after the history (seen once in a full CI run)
    assert names <= {"offline-test"}, (names, kinds)
    for metric in ("probe/val_top1", "probe/val_top5", "probe/train_loss", "train/loss_epoch"):
        assert float(history[metric][-1]) == pytest.approx(logged[metric], rel=1e-6), metric
    assert history["embeddings/val/_type"] == ['"images/separated"']
    (png,) = (run_dir / "files" / "media" / "images" / "embeddings").glob("*.png")
    assert Image.open(png).size == (512 + 130, 512)
    assert "model" in artifacts  # log_model: true, recorded for `wandb sync`
    # the whole run configuration, not only the model's arguments
    full = json.loads(config["config"])
    full = full.get("value", full)  # W&B may wrap a config value as {"value": ...}
    assert full["trainer"]["max_epochs"] == 1 and full["data"]["init_args"]["batch_size"] == 20
    assert full["model"]["class_path"] == "simclr_lightning.SimCLR"
