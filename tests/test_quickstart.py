"""The README's quick start commands, run as written (shortened to a few steps): pretraining on
the bundled sample prints kNN top-1 that an independent float64 kNN on the saved encoder
reproduces; linear evaluation, test, predict and export then work from its outputs."""

from __future__ import annotations

import csv
import re

import pytest
import torch
import torchvision

from simclr_lightning import SampleDataModule, SimCLR, export_backbone, sample_root
from simclr_lightning.cli import cli_main
from tests.helpers import REPO
from tests.reference import weighted_knn_top1

CONFIGS = REPO / "configs"
SHORT = ["--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@torch.no_grad()
def features(model: SimCLR, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    pairs = [(model(x), y) for x, y in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def not_empty_folder_warnings(caught) -> list[str]:
    """Lightning warns when a checkpoint folder holds files before the run: on a first run it
    did, as the logs' config.yaml was written into the checkpoints' folder before the check."""
    return [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]


def test_quick_start_commands(tmp_path, monkeypatch, capsys, recwarn):
    monkeypatch.chdir(tmp_path)  # the configs write to outputs/ under the working directory
    cli_main(["fit", f"--config={CONFIGS / 'quickstart.yaml'}", "--trainer.max_epochs=1", *SHORT])
    out = capsys.readouterr().out
    table = re.search(r"kNN top-1 on all 1,000 held-out images .*? 3,000 training images", out)
    assert table, out[-2000:]
    chance, init, after = (
        float(v) for v in re.findall(r"^  (?:chance|randomly|after).*?(\d+\.\d)%", out, re.M)
    )
    assert chance == 10.0 and 5.0 < init < 60.0

    assert not not_empty_folder_warnings(recwarn)
    ckpt = tmp_path / "outputs" / "quickstart" / "checkpoints" / "last.ckpt"
    model = SimCLR.load_from_checkpoint(ckpt, map_location="cpu")
    data = SampleDataModule(batch_size=200, num_workers=0)
    data.setup("fit")
    bank, bank_y = features(model, data.eval_train_dataloader())
    query, query_y = features(model, data.test_dataloader())
    assert len(query) == 1000 and len(bank) == 3000
    reference = weighted_knn_top1(bank, bank_y, query, query_y, k=200, temperature=0.1)
    assert after == pytest.approx(100 * reference, abs=0.051)

    # linear evaluation, test and predict as the README writes them
    cli = cli_main(
        ["fit", f"--config={CONFIGS / 'quickstart_eval.yaml'}", "--trainer.max_epochs=1", *SHORT]
    )
    assert cli.model.class_names[:2] == ["airplane", "automobile"]
    assert not not_empty_folder_warnings(recwarn)
    linear = tmp_path / "outputs" / "quickstart_eval" / "checkpoints" / "last.ckpt"
    tested = cli_main(
        ["test", f"--config={CONFIGS / 'quickstart_eval.yaml'}", f"--ckpt_path={linear}"]
    )
    assert 0.0 <= float(tested.trainer.callback_metrics["test/top1"]) <= 1.0
    cats = sample_root() / "val" / "cat"
    cli_main(
        [
            "predict",
            f"--config={CONFIGS / 'quickstart_eval.yaml'}",
            f"--ckpt_path={linear}",
            "--data=simclr_lightning.ImageFilesDataModule",
            f"--data.paths={cats}",
            "--trainer.callbacks+=simclr_lightning.PredictionWriter",
            "--trainer.callbacks.output=predictions.csv",
        ]
    )
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 100 and rows[0]["file"].endswith(".jpg")
    for row in rows:
        probs = [float(v) for k, v in row.items() if k.startswith("prob_")]
        assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["prediction"] in cli.model.class_names

    # export, then the README's plain torchvision lines
    export_backbone(ckpt, tmp_path / "resnet18_simclr.pt")
    net = torchvision.models.resnet18()
    missing = net.load_state_dict(torch.load(tmp_path / "resnet18_simclr.pt"), strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"]
    net.fc = torch.nn.Identity()
    images, _ = next(iter(data.test_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(images[:8]), model.eval()(images[:8]))
