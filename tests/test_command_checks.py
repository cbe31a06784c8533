"""What a command line is checked for before its Trainer runs, beyond the CLI error table:
the settings that pass, and the warning of an encoder evaluated with no checkpoint."""

from __future__ import annotations

import warnings

import pytest

from simclr_lightning import FeatureWriter, LinearEval, PredictionWriter, SimCLR
from simclr_lightning.command_checks import check_command, check_trainer_settings
from simclr_lightning.errors import SettingError


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"check_val_every_n_epoch": None, "val_check_interval": 1000},
        {"val_check_interval": 0.25, "gradient_clip_val": 0, "log_every_n_steps": 0},
        {"val_check_interval": "00:00:10:00"},  # Lightning's time-based validation
        {"max_epochs": -1, "max_steps": -1, "limit_train_batches": 1.0},  # Lightning's "no limit"
    ],
)
def test_settings_lightning_runs_well_pass(settings):
    check_trainer_settings(settings, "fit")


def test_a_length_of_nothing_is_only_refused_for_fit():
    """validate/test/predict train nothing anyway: max_epochs 0 is not theirs to refuse."""
    for command in ("validate", "test", "predict"):
        check_trainer_settings({"max_epochs": 0, "limit_train_batches": 0}, command)
    with pytest.raises(SettingError, match="trainer.max_steps=0 is invalid"):
        check_trainer_settings({"max_steps": 0}, "fit")


def said(command: str, model, ckpt_path, callbacks=()) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_command(command, model, ckpt_path, list(callbacks))
    return [str(w.message) for w in caught]


def test_a_simclr_encoder_evaluated_without_a_checkpoint_is_said_to_be_random(tmp_path):
    model = SimCLR(backbone="resnet18")
    writer = FeatureWriter(str(tmp_path / "f.npz"))
    for command in ("validate", "test", "predict"):
        assert said(command, model, None, [writer]) == [
            f"{command} of a SimCLR model without --ckpt_path: its encoder is randomly "
            f"initialised (a baseline); give the pretrained checkpoint as --ckpt_path"
        ]
        assert said(command, model, "last", [writer]) == []
    assert said("fit", model, None) == []
    # LinearEval refuses an untrained classifier itself, with its weights in view
    assert said("test", LinearEval(num_classes=2, backbone="resnet18"), None) == []


def test_predict_needs_a_writer_of_either_kind(tmp_path):
    model = SimCLR(backbone="resnet18")
    with pytest.raises(SettingError, match="predict keeps nothing without a writer callback"):
        check_command("predict", model, "x.ckpt", [])
    check_command("predict", model, "x.ckpt", [FeatureWriter(str(tmp_path / "f.npz"))])
    check_command("predict", model, "x.ckpt", [PredictionWriter(str(tmp_path / "p.csv"))])


def test_a_users_own_writer_callback_is_a_writer(tmp_path):
    """A callback that writes in its own predict hook, not a BasePredictionWriter, was not
    told from none; Lightning's progress bars and other callbacks write nothing."""
    from lightning.pytorch.callbacks import Callback, ThroughputMonitor, TQDMProgressBar

    class MyWriter(Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, idx=0):
            pass

    model = SimCLR(backbone="resnet18")
    check_command("predict", model, "x.ckpt", [TQDMProgressBar(), MyWriter()])
    with pytest.raises(SettingError, match="predict keeps nothing without a writer callback"):
        check_command("predict", model, "x.ckpt", [TQDMProgressBar(), ThroughputMonitor(len)])


def test_a_model_that_writes_its_own_predictions_needs_no_writer():
    """A user's LinearEval subclass saving its predictions in on_predict_epoch_end was
    refused as keeping nothing."""

    class SavingEval(LinearEval):
        def on_predict_epoch_end(self) -> None:
            pass

    check_command("predict", SavingEval(num_classes=2, backbone="resnet18"), "x.ckpt", [])
    with pytest.raises(SettingError, match="predict keeps nothing"):
        check_command("predict", LinearEval(num_classes=2, backbone="resnet18"), "x.ckpt", [])
