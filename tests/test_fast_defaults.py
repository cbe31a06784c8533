"""GPU speed settings of SimCLR: channels-last on CUDA and optional torch.compile change the
speed, never the features, the parameters' names or the checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning import SimCLR
from simclr_lightning.errors import SettingError
from tests.helpers import quiet_trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def two_view_loader(n: int = 16, size: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, n, 3, size, size, generator=gen)
    labels = torch.zeros(n, dtype=torch.long)
    data = TensorDataset(a, b, labels)
    return DataLoader(
        data,
        batch_size=8,
        collate_fn=lambda s: (
            (torch.stack([x[0] for x in s]), torch.stack([x[1] for x in s])),
            torch.stack([x[2] for x in s]),
        ),
    )


def fit_steps(model: SimCLR, accelerator: str, steps: int = 1) -> L.Trainer:
    trainer = quiet_trainer(
        accelerator=accelerator,
        max_steps=steps,
    )
    trainer.fit(model, train_dataloaders=two_view_loader())
    return trainer


def test_channels_last_is_a_no_op_on_cpu():
    model = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=32, channels_last=True)
    fit_steps(model, "cpu")
    assert model.backbone.conv1.weight.is_contiguous()  # NCHW kept off CUDA


@pytest.mark.slow
def test_compiled_encoder_keeps_names_and_features(tmp_path, monkeypatch):
    """Compiled through dynamo and AOT autograd as the module asks, with the ``aot_eager``
    backend: inductor's C++ code generation is torch's to test, and took 100-200 s of the
    2-core suite without its cache (a fresh CI machine has none)."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, *args, **kwargs: compile_module(self, *args, backend="aot_eager", **kwargs),
    )
    torch.manual_seed(0)
    eager = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=32)
    compiled = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=32, compile=True)
    compiled.load_state_dict(eager.state_dict())
    trainer = fit_steps(compiled, "cpu")
    assert compiled._compiled
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = SimCLR.load_from_checkpoint(ckpt)  # plain names: loads without compile
    assert set(reloaded.state_dict()) == set(eager.state_dict())
    x = torch.randn(4, 3, 32, 32)
    compiled.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reloaded(x), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@cuda
def test_channels_last_on_cuda_gives_the_same_features(monkeypatch):
    """TF32 off: cuDNN picks other algorithms for the two layouts, and TF32's 10-bit
    mantissa through 18 layers is not what this compares."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    nhwc = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=32, channels_last=True)
    fit_steps(nhwc, "gpu")  # configure_model converts the encoder before DDP/training
    assert nhwc.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=32, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    nchw.cuda().eval()
    nhwc.cuda().eval()  # Lightning's teardown moved it back to the CPU after fit
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@cuda
def test_bf16_fit_step_on_cuda_is_finite():
    model = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=32)
    trainer = quiet_trainer(
        accelerator="gpu",
        precision="bf16-mixed",
        max_steps=2,
        benchmark=True,
    )
    trainer.fit(model, train_dataloaders=two_view_loader())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_unknown_compile_mode_is_refused_up_front():
    with pytest.raises(SettingError, match=r"^model.compile_mode='fast' is invalid: must be one"):
        SimCLR(compile_mode="fast")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_modes_train_on_cuda_and_keep_the_features(mode, monkeypatch):
    """Compared as trained (train mode, gradients on, the training batch's shape): eval
    under no_grad would compile, and autotune, a second graph."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    eager = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=32)
    compiled = SimCLR(
        backbone="resnet18", cifar_stem=False, head_hidden_dim=32, compile=True, compile_mode=mode
    )
    compiled.load_state_dict(eager.state_dict())
    trainer = fit_steps(compiled, "gpu", steps=3)
    assert compiled._compiled
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    eager.load_state_dict(compiled.state_dict())
    eager.cuda().train()
    compiled.cuda().train()  # Lightning's teardown moved it back to the CPU after fit
    x = torch.randn(16, 3, 32, 32, device="cuda")  # both views of a batch of 8, as trained
    got = compiled(x).detach().clone()  # a CUDA graph's output is overwritten by its next run
    torch.testing.assert_close(got, eager(x).detach(), rtol=1e-3, atol=1e-3)
