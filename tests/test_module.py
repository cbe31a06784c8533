import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from simclr_lightning import ImageFolderDataModule, SimCLR, build_resnet
from simclr_lightning.errors import SettingError
from tests.helpers import quiet_trainer, write_png_folder
from tests.reference import (
    cosine_schedule_reference,
    nt_xent_official_reference,
    nt_xent_reference,
)


def pairs(n: int, size: int = 8, value: float | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a, b = (
        torch.randn(n, 3, size, size, generator=gen),
        torch.randn(n, 3, size, size, generator=gen),
    )
    if value is not None:
        a.fill_(value)
    return [((a[i], b[i]), i % 3) for i in range(n)]


def tiny_trainer(**kwargs) -> L.Trainer:
    return quiet_trainer(**({"limit_val_batches": 0} | kwargs))


@pytest.mark.parametrize(
    "name,cifar_stem,in_channels,size,dim",
    [
        ("resnet18", True, 3, 32, 512),
        ("resnet34", False, 1, 28, 512),
        ("resnet50", True, 3, 16, 2048),
    ],
)
def test_backbones(name, cifar_stem, in_channels, size, dim):
    net, feature_dim = build_resnet(name, cifar_stem=cifar_stem, in_channels=in_channels)
    assert feature_dim == dim
    assert net.conv1.in_channels == in_channels
    if cifar_stem:
        assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
        assert isinstance(net.maxpool, nn.Identity)
    net.eval()
    assert net(torch.randn(2, in_channels, size, size)).shape == (2, dim)


def test_cifar_stem_keeps_resolution():
    net, _ = build_resnet("resnet18", cifar_stem=True)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    assert stem(torch.randn(1, 3, 32, 32)).shape[-1] == 32


@pytest.mark.parametrize(
    "kwargs,setting",
    [
        ({"backbone": "resnet19"}, "backbone"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"base_lr": 0.0}, "base_lr"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"lr_scaling": "log"}, "lr_scaling"),
        ({"head_layers": 0}, "head_layers"),
        ({"head_hidden_dim": 0}, "head_hidden_dim"),
    ],
)
def test_bad_hyperparameters_fail_fast(kwargs, setting):
    with pytest.raises(ValueError, match=rf"^model\.{setting}=.* is invalid: must be "):
        SimCLR(**kwargs)


def test_learning_rate_follows_scaling_rule_warmup_and_cosine():
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = SimCLR(
        head_hidden_dim=16,
        head_output_dim=8,
        optimizer="sgd",
        base_lr=0.4,
        warmup_epochs=1,
        lr_scaling="linear",
    )
    trainer = tiny_trainer(max_epochs=3, callbacks=[Record()])
    trainer.fit(model, DataLoader(pairs(16), batch_size=4, shuffle=True))
    peak = 0.4 * 4 / 256
    expected = [peak * cosine_schedule_reference(s, 4, 12, 0.0) for s in range(12)]
    assert lrs == pytest.approx(expected)
    # BN and bias parameters are not decayed; the others are.
    decays = [g["weight_decay"] for g in trainer.optimizers[0].param_groups]
    assert decays == [model.hparams.weight_decay, 0.0]


def test_training_step_returns_features_for_callbacks_and_logs_health():
    seen = {}

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            (x_a, x_b), _ = batch
            with torch.no_grad():  # the same train-mode forward the step is about to make
                z_a, z_b = pl_module.head(pl_module.backbone(torch.cat([x_a, x_b]))).chunk(2)
            # the default: google-research/simclr's loss_a + loss_b
            seen["reference_loss"] = float(nt_xent_official_reference(z_a, z_b, 0.5))
            unit_a, unit_b = (torch.nn.functional.normalize(z.double(), dim=1) for z in (z_a, z_b))
            seen["reference_pos_cos"] = float((unit_a * unit_b).sum(dim=1).mean())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update(outputs)

    model = SimCLR(head_hidden_dim=16, head_output_dim=8, temperature=0.5)
    trainer = tiny_trainer(max_steps=1, callbacks=[Grab()])
    trainer.fit(model, DataLoader(pairs(6), batch_size=6))
    assert seen["features"].shape == (12, 512) and not seen["features"].requires_grad
    assert seen["labels"].tolist() == [0, 1, 2, 0, 1, 2] * 2
    logged = trainer.callback_metrics
    for key in (
        "train/loss",
        "train/lr",
        "train/pos_cos",
        "train/neg_cos",
        "train/contrastive_acc",
        "train/z_std",
    ):
        assert key in logged, key
    assert float(logged["train/loss"]) == pytest.approx(seen["reference_loss"], rel=1e-4)
    assert float(logged["train/pos_cos"]) == pytest.approx(seen["reference_pos_cos"], abs=1e-4)


def test_a_trainer_that_never_logs_still_trains():
    """``Trainer(log_every_n_steps=0)`` is Lightning's way to log nothing per step; the
    collapse watch divided the step by it."""
    model = SimCLR(head_hidden_dim=16, head_output_dim=8)
    trainer = tiny_trainer(max_steps=2, log_every_n_steps=0)
    trainer.fit(model, DataLoader(pairs(6), batch_size=6))
    assert trainer.global_step == 2


def test_loss_reduction_mean_logs_the_papers_mean():
    seen = {}

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            (x_a, x_b), _ = batch
            with torch.no_grad():
                z_a, z_b = pl_module.head(pl_module.backbone(torch.cat([x_a, x_b]))).chunk(2)
            seen["reference_loss"] = float(nt_xent_reference(z_a, z_b, 0.5))

    model = SimCLR(head_hidden_dim=16, head_output_dim=8, loss_reduction="mean")
    trainer = tiny_trainer(max_steps=1, callbacks=[Grab()])
    trainer.fit(model, DataLoader(pairs(6), batch_size=6))
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(
        seen["reference_loss"], rel=1e-4
    )


def test_a_checkpoint_from_before_loss_reduction_resumes_with_the_mean(tmp_path):
    """Such a run was trained with the mean: resuming it must not double its gradients."""
    model = SimCLR(head_hidden_dim=16, head_output_dim=8)
    trainer = tiny_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(pairs(6), batch_size=6))
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    old = torch.load(path, weights_only=False)
    del old["hyper_parameters"]["loss_reduction"]
    torch.save(old, path)

    with pytest.warns(UserWarning, match="predates model.loss_reduction"):
        loaded = SimCLR.load_from_checkpoint(path)
    assert loaded.criterion.scale == 1.0 and loaded.hparams.loss_reduction == "mean"
    resumed = SimCLR(head_hidden_dim=16, head_output_dim=8)
    trainer = tiny_trainer(max_steps=2, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="predates model.loss_reduction"):
        trainer.fit(resumed, DataLoader(pairs(6), batch_size=6), ckpt_path=path)
    assert resumed.criterion.scale == 1.0
    trainer.save_checkpoint(tmp_path / "next.ckpt")  # and says so from now on
    saved = torch.load(tmp_path / "next.ckpt", weights_only=False)["hyper_parameters"]
    assert saved["loss_reduction"] == "mean"


def test_nan_loss_stops_training_with_a_clear_error():
    model = SimCLR(head_hidden_dim=16, head_output_dim=8)
    trainer = tiny_trainer(max_steps=2)
    with pytest.raises(FloatingPointError, match="train/loss is nan"):
        trainer.fit(model, DataLoader(pairs(4, value=float("nan")), batch_size=4))
    # the module goes on to a fit of finite data (its weights are still finite: the step of
    # the NaN loss made NaN gradients, and the check stopped the run before the next one)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    again = tiny_trainer(max_steps=2)
    again.fit(model, DataLoader(pairs(4), batch_size=4))
    assert again.global_step == 2


@pytest.mark.parametrize(
    ("batch", "shown"),
    [
        ([torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8)], "(a tensor of shape (4, 3, 8, 8), a"),
        (((torch.zeros(4, 3, 8, 8),) * 2, torch.zeros(4), ["a.jpg"] * 4), "(("),  # lightly's
        ({"views": torch.zeros(4, 3, 8, 8)}, "dict"),
        (((torch.zeros(4, 3, 8, 8),) * 2, None), "NoneType"),
    ],
    ids=["views-only", "with-filenames", "dict", "no-labels"],
)
def test_a_batch_of_another_shape_is_one_clear_error(batch, shown):
    """A user's own loader: the step unpacked any 2-item batch as two views and failed deep
    inside (too many values to unpack; 6 channels for a convolution made for 3)."""
    model = SimCLR(head_hidden_dim=16, head_output_dim=8)
    with pytest.raises(
        TypeError, match=r"SimCLR takes training batches \(\(view_a, view_b\)"
    ) as err:
        model.training_step(batch, 0)
    assert shown in str(err.value)


def test_data_of_single_labelled_views_is_refused_naming_data_task(tmp_path):
    """A pretraining config after an evaluation one keeps data.task=classify: the run failed
    at its first batch with a shape error that did not name the setting."""
    write_png_folder(tmp_path, count=4, size=16)
    data = ImageFolderDataModule(str(tmp_path), batch_size=4, task="classify", num_workers=0)
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(SettingError, match=(
        r"^SimCLR pretrains on two augmented views of each image: set data.task=pretrain "
        r"\(got data.task='classify', single views for LinearEval\)$"
    )):  # fmt: skip
        trainer.fit(SimCLR(head_hidden_dim=16, head_output_dim=8), datamodule=data)
    assert trainer.global_step == 0


def test_an_endless_run_is_refused_before_training():
    model = SimCLR(backbone="resnet18", cifar_stem=True, head_hidden_dim=16, head_output_dim=8)
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1)
    with pytest.raises(SettingError, match=r"SimCLR's cosine schedule needs a run of known"):
        trainer.fit(model, DataLoader(pairs(8), batch_size=4))
    assert trainer.global_step == 0


def test_accumulation_a_scheduler_would_start_later_is_refused_before_training():
    """Lightning's GradientAccumulationScheduler sets trainer.accumulate_grad_batches at the
    start of the epoch it names, after the optimizer's check: the run accumulated without the
    refusal (and its cosine, planned for one batch a step, never ended)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    model = SimCLR(head_hidden_dim=16, head_output_dim=8)
    trainer = quiet_trainer(max_epochs=2, callbacks=[GradientAccumulationScheduler({1: 2})])
    with pytest.raises(SettingError, match="accumulation of up to 2 is invalid: must be 1"):
        trainer.fit(model, DataLoader(pairs(8), batch_size=4))
    assert trainer.global_step == 0


def test_predicting_with_a_pretraining_checkpoint_prepares_images_as_pretraining_did(tmp_path):
    """ImageFilesDataModule read a model's ``preprocessing``, which SimCLR kept private: the
    features of a CIFAR checkpoint were computed on 224 px crops with ImageNet statistics."""
    import numpy as np
    from PIL import Image

    from simclr_lightning import ImageFilesDataModule, SampleDataModule
    from simclr_lightning.data.sample import sample_root

    trainer = tiny_trainer(max_steps=1, default_root_dir=tmp_path)
    model = SimCLR(head_hidden_dim=16, head_output_dim=8)
    trainer.fit(model, datamodule=SampleDataModule(batch_size=8, num_workers=0))
    trainer.save_checkpoint(tmp_path / "pretrain.ckpt")

    files = sorted((sample_root() / "val" / "cat").iterdir())[:3]
    loaded = SimCLR.load_from_checkpoint(tmp_path / "pretrain.ckpt").eval()
    got = torch.cat(
        quiet_trainer().predict(loaded, datamodule=ImageFilesDataModule([str(f) for f in files]))
    )
    # CIFAR-10's statistics at 32 px, as the sample's data module trains with them
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    rgb = [np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files]
    x = (torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        want = loaded(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_images_with_another_number_of_channels_than_the_encoders_are_one_clear_error():
    """Grayscale MNIST into an RGB stem (or RGB into a one-channel one) failed with a
    convolution's traceback, at the kNN report before any training or at the first step."""
    from simclr_lightning import LinearEval

    model = SimCLR(backbone="resnet18", head_hidden_dim=8, head_output_dim=8)
    with pytest.raises(SettingError, match=r"have 1 channel\(s\) .* takes 3: set model.in_"):
        model(torch.zeros(2, 1, 16, 16))
    gray = SimCLR(backbone="resnet18", in_channels=1, head_hidden_dim=8, head_output_dim=8)
    assert gray(torch.zeros(2, 1, 16, 16)).shape == (2, 512)
    with pytest.raises(SettingError, match="set model.in_channels=3 for this data"):
        gray(torch.zeros(2, 3, 16, 16))
    classifier = LinearEval(num_classes=2, backbone="resnet18", in_channels=1)
    with pytest.raises(SettingError, match=r"have 3 channel\(s\) but the encoder takes 1"):
        classifier(torch.zeros(2, 3, 16, 16))
    # TResNet's stem rearranges pixels into 16 x in_chans channels before its first
    # convolution: the encoder's setting, not that convolution, says what it takes
    tresnet = LinearEval(num_classes=2, backbone="timm:tresnet_m", cifar_stem=False)
    assert tresnet(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_the_readmes_fashion_mnist_command(fashion_mnist_dir, tmp_path, capsys):
    """README's Offline section: MNISTDataModule with a one-channel encoder trains; without
    model.in_channels the run stops in one line that says what to set."""
    from simclr_lightning.cli import main

    args = [
        "simclr-lightning", "fit", "--model=SimCLR", "--model.backbone=resnet18",
        "--model.head_hidden_dim=16", "--model.head_output_dim=8", "--model.warmup_epochs=0",
        "--data=MNISTDataModule", f"--data.data_dir={fashion_mnist_dir}",
        "--data.batch_size=16", "--data.num_workers=0", "--trainer.accelerator=cpu",
        "--trainer.precision=32-true", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", args)
        with pytest.raises(SystemExit) as stopped:
            main()
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error == (
            "simclr-lightning: error: the images have 1 channel(s) but the encoder takes 3: "
            "set model.in_channels=1 for this data"
        )
        patch.setattr("sys.argv", [*args, "--model.in_channels=1"])
        main()
