"""LinearEval: a frozen encoder stays the pretrained one, fine-tuning trains it at its own rate,
the cosine runs per iteration over the whole run, and its checkpoints stand alone."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning.errors import SettingError
from simclr_lightning.evaluation import LinearEval
from simclr_lightning.lagged_reads import LaggedReads
from tests.device_reads import device_reads_per_step
from tests.helpers import quiet_trainer
from tests.test_checkpoint import save_simclr_checkpoint
from tests.test_lagged_reads import SlowMarker, StepLosses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def simclr_ckpt(tmp_path):
    """A CIFAR-stem, 1-channel SimCLR checkpoint: not LinearEval's defaults."""
    path = tmp_path / "simclr.ckpt"
    model = save_simclr_checkpoint(path, cifar_stem=True, in_channels=1)
    return path, model


def labelled(n: int, seed: int, channels: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 16, 16, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    y[::5] = -1  # unlabeled images carry no loss
    return list(zip(x, y, strict=True))


class Spy(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.backbone_training: list[bool] = []
        self.backbone_grads: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.backbone_training.append(pl_module.backbone.training)
        self.backbone_grads.append(any(p.grad is not None for p in pl_module.backbone.parameters()))


def fit(model: LinearEval, epochs: int, spy: Spy | None = None, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[spy] if spy else [], **kwargs)
    trainer.fit(
        model,
        DataLoader(labelled(24, seed=1), batch_size=8, shuffle=True),
        DataLoader(labelled(10, seed=2), batch_size=4),
    )
    return trainer


def test_frozen_encoder_is_exactly_the_pretrained_one(simclr_ckpt):
    path, pretrained = simclr_ckpt
    # Architecture arguments are overridden by the checkpoint's.
    model = LinearEval(str(path), num_classes=3, backbone="resnet34", cifar_stem=False)
    assert (model.hparams.backbone, model.hparams.cifar_stem, model.hparams.in_channels) == (
        "resnet18",
        True,
        1,
    )
    before = {k: v.clone() for k, v in pretrained.backbone.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    spy = Spy()
    fit(model, epochs=2, spy=spy)  # includes the sanity check's validation
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # weights and BatchNorm statistics
    assert not torch.equal(model.head.weight, head_before)
    assert spy.backbone_training == [False] * 6 and spy.backbone_grads == [False] * 6
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("mode", ["as built", "left in eval mode"])
def test_finetuning_trains_the_encoder_at_its_own_rate(simclr_ckpt, mode):
    """Also from a module left in eval mode (``load_from_checkpoint`` gives one, and Lightning
    keeps the mode a module had before fit): fine-tuning ran with frozen BatchNorm."""
    path, pretrained = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, finetune=True, lr=0.1, backbone_lr=0.01)
    if mode == "left in eval mode":
        model.eval()
    spy = Spy()
    fit(model, epochs=1, spy=spy)
    changed = [
        name
        for name, tensor in model.backbone.state_dict().items()
        if not torch.equal(tensor, pretrained.backbone.state_dict()[name])
    ]
    assert "conv1.weight" in changed and "bn1.running_mean" in changed
    assert spy.backbone_training == [True] * 3 and spy.backbone_grads == [True] * 3
    # first step: head groups at lr, encoder groups at backbone_lr
    assert sorted(set(spy.lrs[0])) == [0.01, 0.1]


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("scaling", ["linear", "sqrt", "none"])
def test_learning_rates_scale_with_the_batch_as_the_paper(simclr_ckpt, scaling, accumulate):
    """google-research/simclr scales fine-tuning's and linear evaluation's rates as
    pretraining's: lr x B/256 (linear) or lr x sqrt(B), B the images of one optimizer step
    (8 a batch here, times the accumulated batches: the rule scaled for 8 whatever the
    accumulation)."""
    images = 8 * accumulate
    factor = {"linear": images / 256, "sqrt": math.sqrt(images), "none": 1.0}[scaling]
    path, _ = simclr_ckpt
    model = LinearEval(
        str(path), num_classes=3, finetune=True, lr=0.1, backbone_lr=0.01, lr_scaling=scaling
    )
    spy = Spy()
    fit(model, epochs=1, spy=spy, accumulate_grad_batches=accumulate)
    assert sorted(set(spy.lrs[0])) == pytest.approx([0.01 * factor, 0.1 * factor], rel=1e-12)


def test_without_a_rule_no_batch_size_is_needed(simclr_ckpt):
    """A loader with a batch sampler has no batch_size: only a learning-rate rule needs one
    (model.lr_scaling=none trained, the other rules say what is missing)."""
    from torch.utils.data import BatchSampler, SequentialSampler

    path, _ = simclr_ckpt
    rows = labelled(16, seed=1)
    loader = DataLoader(rows, batch_sampler=BatchSampler(SequentialSampler(rows), 8, False))
    spy = Spy()
    trainer = quiet_trainer(max_steps=2, callbacks=[spy])
    trainer.fit(LinearEval(str(path), num_classes=3, lr=0.1), loader)
    assert trainer.global_step == 2 and spy.lrs[0] == [0.1] * len(spy.lrs[0])
    with pytest.raises(ValueError, match=r"cannot tell the per-device batch size"):
        model = LinearEval(str(path), num_classes=3, lr=0.1, lr_scaling="linear")
        quiet_trainer(max_steps=1).fit(model, loader)


def test_an_unknown_learning_rate_rule_is_refused_when_built():
    with pytest.raises(SettingError, match=r"model\.lr_scaling='cubic' is invalid"):
        LinearEval(num_classes=3, lr_scaling="cubic")


@pytest.mark.parametrize("epochs", [2, 5])
def test_cosine_is_per_iteration_over_the_whole_run(simclr_ckpt, epochs):
    path, _ = simclr_ckpt
    spy = Spy()
    fit(LinearEval(str(path), num_classes=3, lr=0.4, optimizer="lars"), epochs=epochs, spy=spy)
    total = 3 * epochs  # 24 images / batch 8 per epoch
    want = [0.4 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert len(spy.lrs) == total
    for got, expected in zip(spy.lrs, want, strict=True):
        assert got == pytest.approx([expected] * len(got))


@pytest.mark.parametrize("finetune", [False, True])
def test_lars_leaves_the_classifier_unadapted_as_the_official_code(simclr_ckpt, finetune):
    """google-research/simclr excludes ``head_supervised`` from LARS's trust ratio (its weight
    gets plain L2 decay, its bias none): one step moves the classifier by exactly
    ``-lr * (grad + wd * w)``, a momentum-SGD step written out here in float64."""
    path, _ = simclr_ckpt
    lr, wd = 0.5, 0.01
    model = LinearEval(
        str(path),
        num_classes=3,
        optimizer="lars",
        lr=lr,
        weight_decay=wd,
        nesterov=False,  # a first momentum step is then the gradient step itself
        zero_init_classifier=False,
        finetune=finetune,
        backbone_lr=0.0,  # the encoder stays put, so the features below are the step's
    )
    rows = labelled(8, seed=1)
    x = torch.stack([r[0] for r in rows])
    y = torch.stack([r[1] for r in rows])
    w0, b0 = model.head.weight.detach().double().clone(), model.head.bias.detach().double()
    b0 = b0.clone()
    model.train()  # fine-tuning: the step's features use batch statistics
    with torch.no_grad():
        features = model.projection(model.backbone(x)).double()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    keep = y >= 0
    F.cross_entropy((features @ w.T + b)[keep], y[keep]).backward()
    trainer = quiet_trainer(max_steps=1, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(rows, batch_size=8))
    torch.testing.assert_close(model.head.weight.double(), w0 - lr * (w.grad + wd * w0))
    torch.testing.assert_close(model.head.bias.double(), b0 - lr * b.grad)


def test_own_checkpoint_rebuilds_without_the_pretraining_file(simclr_ckpt, tmp_path):
    path, _ = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, class_names=["cat", "dog", "eel"])
    trainer = fit(model, epochs=1)
    trainer.save_checkpoint(tmp_path / "linear.ckpt")
    path.unlink()
    restored = LinearEval.load_from_checkpoint(tmp_path / "linear.ckpt")
    assert restored.hparams.checkpoint is None and restored.hparams.cifar_stem is True
    assert restored.class_names == ["cat", "dog", "eel"]
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_validation_accuracy_is_counted_over_labelled_images(simclr_ckpt):
    path, _ = simclr_ckpt
    model = LinearEval(str(path), num_classes=3)
    trainer = fit(model, epochs=1)
    val = labelled(10, seed=2)
    x = torch.stack([v[0] for v in val])
    y = torch.stack([v[1] for v in val])
    with torch.no_grad():
        logits = model.eval()(x)
    keep = y >= 0
    want = (logits[keep].argmax(1) == y[keep]).float().mean()
    assert float(trainer.callback_metrics["val/top1"]) == pytest.approx(float(want))
    assert float(trainer.callback_metrics["val/top5"]) == 1.0  # top-k capped at 3 classes


def test_two_view_batches_are_refused(simclr_ckpt):
    path, _ = simclr_ckpt
    pairs = [((torch.randn(1, 16, 16), torch.randn(1, 16, 16)), 0) for _ in range(4)]
    with pytest.raises(ValueError, match="task=classify"):
        quiet_trainer(max_steps=1).fit(LinearEval(str(path), num_classes=3), DataLoader(pairs))


# -- SimCLR v2: the classifier after layer k of the pretrained projection head --------------------


def first_head_layer_by_hand(pretrained, x: torch.Tensor) -> torch.Tensor:
    """relu(BN(W h)) from the checkpoint's tensors, BN with its running statistics (eval)."""
    state = pretrained.state_dict()
    h = pretrained.backbone.eval()(x)
    z = h @ state["head.net.0.weight"].T
    z = (z - state["head.net.1.running_mean"]) / torch.sqrt(state["head.net.1.running_var"] + 1e-5)
    return torch.relu(z * state["head.net.1.weight"] + state["head.net.1.bias"])


def test_classifier_on_the_first_head_layer(simclr_ckpt):
    path, pretrained = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, head_layers=1).eval()
    assert model.feature_dim == 32  # the head's hidden width, not the encoder's 512
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        features = model.projection(model.backbone(x))
        torch.testing.assert_close(features, first_head_layer_by_hand(pretrained, x))
    assert torch.count_nonzero(model.head.weight) == 0  # zero_init_logits_layer
    whole = LinearEval(str(path), num_classes=3, head_layers=3)
    assert whole.feature_dim == 8 and len(whole.projection) == 8  # 3 layers, output BN


def test_predict_goes_through_the_kept_head_layer(simclr_ckpt):
    """``predict`` (and PredictionWriter) classify the same features as training did."""
    path, pretrained = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, head_layers=1, zero_init_classifier=False)
    x = torch.randn(5, 1, 16, 16)
    (probs,) = quiet_trainer().predict(model, DataLoader(TensorDataset(x), batch_size=5))
    with torch.no_grad():
        features = first_head_layer_by_hand(pretrained, x).double()
    logits = features @ model.head.weight.double().T + model.head.bias.double()
    torch.testing.assert_close(probs.double(), logits.softmax(dim=1), rtol=0, atol=1e-6)


def test_finetuning_from_a_head_layer_trains_it_and_rebuilds_from_its_own_checkpoint(
    simclr_ckpt, tmp_path
):
    path, pretrained = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, head_layers=1, finetune=True, backbone_lr=0.05)
    spy = Spy()
    trainer = fit(model, epochs=1, spy=spy)
    assert not torch.equal(model.projection[0].weight, pretrained.head.net[0].weight)
    assert sorted(set(spy.lrs[0])) == [0.05, 0.1]
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    path.unlink()
    restored = LinearEval.load_from_checkpoint(tmp_path / "ft.ckpt")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_frozen_head_layers_stay_pretrained(simclr_ckpt):
    path, pretrained = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, head_layers=2)
    fit(model, epochs=1)
    for name, tensor in model.projection.state_dict().items():
        assert torch.equal(tensor, pretrained.head.net.state_dict()[name]), name


def test_head_layers_need_a_head(simclr_ckpt, tmp_path):
    with pytest.raises(ValueError, match="model.head_layers=1"):
        LinearEval(num_classes=3, head_layers=1)
    path, _ = simclr_ckpt
    with pytest.raises(ValueError, match="head_layers=4 is invalid: must be <= 3"):
        LinearEval(str(path), num_classes=3, head_layers=4)


def test_predict_gives_float32_probabilities_under_bf16():
    """The encoder may run in bf16; what a user reads is not rounded to bf16's 8 bits."""
    torch.manual_seed(0)
    model = LinearEval(num_classes=10, backbone="resnet18", zero_init_classifier=False).eval()
    x = torch.randn(6, 3, 32, 32)
    trainer = quiet_trainer(precision="bf16-mixed")
    (probs,) = trainer.predict(model, DataLoader(TensorDataset(x), batch_size=6))
    assert probs.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(x)  # the same bf16 encoder pass
    logits = features.double() @ model.head.weight.double().T + model.head.bias.double()
    torch.testing.assert_close(probs.double(), logits.softmax(dim=1), rtol=0, atol=1e-6)
    rounded = probs.to(torch.bfloat16).float()
    assert not torch.equal(probs, rounded)  # more digits than bf16 holds


def test_predict_gives_float32_probabilities_under_bf16_true():
    """bf16-true makes the classifier's own weights bf16: the probabilities still come from
    float32 (copies of) them, not from a float32/bf16 matmul that cannot run."""
    torch.manual_seed(0)
    model = LinearEval(num_classes=3, backbone="resnet18", zero_init_classifier=False).eval()
    x = torch.randn(4, 3, 8, 8)
    trainer = quiet_trainer(precision="bf16-true")
    (probs,) = trainer.predict(model, DataLoader(TensorDataset(x), batch_size=4))
    assert probs.dtype == torch.float32 and model.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        features = model.backbone(x.bfloat16())  # the same bf16 encoder pass
    logits = features.double() @ model.head.weight.double().T + model.head.bias.double()
    torch.testing.assert_close(probs.double(), logits.softmax(dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))


class Scores(L.Callback):
    """Each training batch's loss and hits over its labelled rows, from the logits the step
    is about to compute (frozen encoder: the forward has no side effect)."""

    def __init__(self) -> None:
        self.loss_sum = self.hits = self.rows = self.images = 0.0
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            logits = pl_module(x).double()
        batch_loss, hits, rows = 0.0, 0, 0
        for row, label in zip(logits, y.tolist(), strict=True):
            if label < 0:
                continue
            batch_loss += float(torch.logsumexp(row, 0) - row[label])
            hits += int(row.argmax()) == label
            rows += 1
        self.losses.append(batch_loss / max(rows, 1))
        self.loss_sum += batch_loss / max(rows, 1) * len(y)
        self.hits, self.rows, self.images = self.hits + hits, self.rows + rows, self.images + len(y)


def test_training_loss_and_top1_count_only_labelled_rows(simclr_ckpt):
    path, _ = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, lr=0.5)
    scores = Scores()
    trainer = quiet_trainer(max_epochs=1, callbacks=[scores], limit_val_batches=0)
    trainer.fit(model, DataLoader(labelled(24, seed=1), batch_size=8, shuffle=True))
    logged = trainer.callback_metrics
    assert len(scores.losses) == 3 and scores.rows < scores.images  # some rows unlabelled
    assert float(logged["train/top1"]) == pytest.approx(scores.hits / scores.rows, abs=1e-6)
    assert float(logged["train/loss_epoch"]) == pytest.approx(
        scores.loss_sum / scores.images, rel=1e-5
    )


def test_an_endless_run_is_refused_before_training():
    model = LinearEval(num_classes=3, backbone="resnet18", cifar_stem=True)
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1)
    with pytest.raises(SettingError, match=r"trainer.max_epochs=-1 and trainer.max_steps=-1"):
        trainer.fit(model, DataLoader(labelled(8, seed=0, channels=3), batch_size=4))
    assert trainer.global_step == 0


def test_training_reads_no_device_value_per_step_and_the_bar_shows_the_read_loss(simclr_ckpt):
    """As SimCLR's: a device loss in the progress bar is read on the host after every batch,
    a GPU wait per step; the bar shows the loss read back two steps late instead."""
    path, _ = simclr_ckpt
    fits: dict[int, tuple[L.Trainer, list[torch.Tensor]]] = {}

    def fit(steps: int, callbacks: list[L.Callback]) -> None:
        model = LinearEval(str(path), num_classes=3)
        model._reads = LaggedReads(2, marker=lambda device: SlowMarker([]))  # as on a GPU
        record = StepLosses()
        trainer = quiet_trainer(
            max_steps=steps, callbacks=[*callbacks, record], limit_val_batches=0
        )
        trainer.fit(model, DataLoader(labelled(8 * steps, seed=3), batch_size=8))
        fits[steps] = trainer, record.losses

    assert device_reads_per_step(fit) == {}
    trainer, losses = fits[8]
    assert set(trainer.progress_bar_metrics) == {"loss"}
    assert trainer.progress_bar_metrics["loss"] == pytest.approx(float(losses[5]), rel=1e-6)


def test_a_resume_from_any_step_logs_each_epochs_whole_training_top1(tmp_path):
    """train/top1 counts the whole epoch after a mid-epoch resume (the sums are in the
    checkpoint), and a resume from an epoch's last batch, where Lightning skips that epoch's
    end and the next one's start, does not carry the finished epoch into the next."""
    rows = labelled(8, seed=1) * 3  # every batch the same: a plain loader restarts its epoch

    def fit(name: str, ckpt_path=None) -> dict[int, float]:
        torch.manual_seed(0)
        model = LinearEval(num_classes=3, in_channels=1, lr=0.5, zero_init_classifier=False)
        every = ModelCheckpoint(tmp_path / "ckpts", "{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = quiet_trainer(
            max_epochs=3,
            callbacks=[every] if ckpt_path is None else [],
            enable_checkpointing=True,
            logger=CSVLogger(tmp_path, name=name),
            limit_val_batches=0,
        )
        trainer.fit(model, DataLoader(rows, batch_size=8), ckpt_path=ckpt_path)
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
            logged = [r for r in csv.DictReader(f) if r.get("train/top1")]
        # and train/loss_epoch, Lightning's own epoch mean, which it does not checkpoint
        return {
            int(r["epoch"]): (float(r["train/top1"]), float(r["train/loss_epoch"])) for r in logged
        }

    full = fit("full")
    assert sorted(full) == [0, 1, 2] and len({top1 for top1, _ in full.values()}) > 1
    # mid-epoch 0, the last batch of epoch 0 (its end is never run again), mid-epoch 1
    for step, epochs in ((1, [0, 1, 2]), (3, [1, 2]), (4, [1, 2])):
        resumed = fit(f"from{step}", tmp_path / "ckpts" / f"step={step}.ckpt")
        assert sorted(resumed) == epochs, step
        for epoch in epochs:
            assert resumed[epoch] == pytest.approx(full[epoch], rel=1e-5, abs=1e-6), step


def test_a_second_fit_of_the_module_counts_only_its_own_epoch(simclr_ckpt):
    path, _ = simclr_ckpt
    model = LinearEval(str(path), num_classes=3, lr=0.5)
    for _ in range(2):  # each fit starts at epoch 0 again
        scores = Scores()
        trainer = quiet_trainer(max_epochs=1, callbacks=[scores], limit_val_batches=0)
        trainer.fit(model, DataLoader(labelled(24, seed=1), batch_size=8))
        logged = float(trainer.callback_metrics["train/top1"])
        assert logged == pytest.approx(scores.hits / scores.rows, abs=1e-6)


def test_int32_labels_train_as_int64_ones(simclr_ckpt):
    """A user's dataset may give int32 labels: cross-entropy takes int64 targets. Reference:
    the same run with int64 labels."""
    path, _ = simclr_ckpt
    heads = []
    for dtype in (torch.int64, torch.int32):
        model = LinearEval(str(path), num_classes=3, lr=0.1)
        rows = [(x, y.to(dtype)) for x, y in labelled(24, seed=1)]
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
        trainer.fit(model, DataLoader(rows, batch_size=8))
        heads.append(model.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], LinearEval(str(path), num_classes=3).head.weight)
