"""GlobalBatchNorm: BatchNorm on the global batch under real 2-process gloo DDP equals one
process holding the concatenated batch (float64 references), and the plugin converts and
reverts layers without changing the model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jsonargparse import Namespace
from torch import nn

from simclr_lightning import GlobalBatchNorm, SimCLR
from simclr_lightning.batchnorm import (
    GlobalBatchNorm1d,
    GlobalBatchNorm2d,
    _GlobalNormalize,
    global_batch_stats,
)
from simclr_lightning.cli import global_batchnorm
from simclr_lightning.heads import ScaleBatchNorm1d
from tests.ddp_batchnorm_script import PER_RANK, WORLD, make_data, make_model
from tests.ddp_helpers import run_ddp_script
from tests.reference import nt_xent_official_reference

GLOBAL = "simclr_lightning.batchnorm.GlobalBatchNorm"


def assert_near(got: torch.Tensor, reference: torch.Tensor, tol: float, what: str) -> None:
    """float32 against float64: the largest error is at most ``tol`` of the largest value."""
    error = (got.double() - reference.detach()).abs().max() / reference.abs().max()
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


def batchnorm_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def test_statistics_and_backward_match_float64_formula_in_a_one_process_group(tmp_path):
    """The stats against a float64 formula, the backward against autograd's numerical
    gradient (gradcheck), through a real (1-process) gloo group."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64) * 3 + 7
        mean, var, count = global_batch_stats(x)
        flat = x.transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(mean, flat.sum(1) / flat.shape[1])
        torch.testing.assert_close(var, ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1))
        assert count.item() == 6 * 4 * 5

        x.requires_grad_(True)
        weight = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)

        def normalize(x, weight, bias):
            mean, var, count = global_batch_stats(x.detach())
            # the statistics depend on x: recompute them inside for gradcheck's perturbations
            invstd = torch.rsqrt(var + 1e-5)
            return _GlobalNormalize.apply(x, weight, bias, mean, invstd, count)

        expected = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
        torch.testing.assert_close(normalize(x, weight, bias), expected)
        assert torch.autograd.gradcheck(normalize, (x, weight, bias))
        assert torch.autograd.gradcheck(lambda x, w: normalize(x, w, None), (x, weight))
    finally:
        dist.destroy_process_group()


def test_bf16_inputs_keep_no_float32_copy_for_backward(tmp_path, monkeypatch):
    """Under bf16 autocast the layer normalises in float32 and saved a float32 copy of its
    input for backward: twice a plain BatchNorm's memory for every layer of the network. Now
    what backward keeps is the bf16 input (and per-channel vectors); output and gradients are
    those of the float32 computation, checked against a float64 formula."""
    from simclr_lightning import batchnorm

    monkeypatch.setattr(batchnorm, "_synced", lambda: True)  # a 1-process group: global = local
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        layer = GlobalBatchNorm2d(8)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=gen)
            layer.bias.uniform_(-1, 1, generator=gen)
        x = (torch.randn(16, 8, 6, 6, generator=gen) * 2 + 3).bfloat16().requires_grad_(True)
        saved: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        largest = max(saved, key=lambda t: t.numel() * t.element_size())
        assert largest.numel() * largest.element_size() <= x.numel() * x.element_size()

        grad = torch.randn(out.shape, generator=gen).bfloat16()
        out.backward(grad)
        x64 = x.detach().double().requires_grad_(True)
        w64, b64 = (p.detach().double().requires_grad_(True) for p in (layer.weight, layer.bias))
        ref = F.batch_norm(x64, None, None, w64, b64, training=True, eps=layer.eps)
        ref.backward(grad.double())
        assert_near(out.float(), ref, 1e-2, "output")  # bf16 rounding of the output
        assert_near(x.grad.float(), x64.grad, 1e-2, "input gradient")
        assert_near(layer.weight.grad, w64.grad, 1e-5, "weight gradient")
        assert_near(layer.bias.grad, b64.grad, 1e-5, "bias gradient")
    finally:
        dist.destroy_process_group()


def test_plugin_converts_every_batchnorm_in_place_and_revert_restores_the_classes():
    model = SimCLR(backbone="resnet18", cifar_stem=False, head_hidden_dim=8, head_output_dim=4)
    classes = {name: type(m) for name, m in model.named_modules()}
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        before = model.head(model(images))

    assert GlobalBatchNorm().apply(model) is model
    converted = {name: type(m) for name, m in model.named_modules()}
    assert converted["backbone.bn1"] is GlobalBatchNorm2d
    assert converted["head.net.1"] is GlobalBatchNorm1d
    out_bn = model.head.net[-1]
    assert type(out_bn) is GlobalBatchNorm1d and out_bn.bias is None  # scale-only kept
    assert isinstance(out_bn, nn.BatchNorm1d)
    assert sum(t is not classes[n] for n, t in converted.items()) == 20 + 3
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():  # eval mode (and no process group): plain BatchNorm
        torch.testing.assert_close(model.head(model(images)), before, rtol=0, atol=0)

    GlobalBatchNorm().revert(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert type(model.head.net[-1]) is ScaleBatchNorm1d
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_two_process_ddp_equals_one_process_on_the_concatenated_batch_in_float64(tmp_path):
    ranks = run_ddp_script("ddp_batchnorm_script.py", WORLD, tmp_path / "ddp", "--batchnorm=global")
    assert all("GlobalBatchNorm2d" in r["classes"] for r in ranks)

    # float64 reference: torch's own BatchNorm, one process, the concatenation of both batches
    views_a, views_b = make_data()
    ids = torch.cat([r["ids"] for r in ranks])
    assert sorted(ids.tolist()) == list(range(WORLD * PER_RANK))
    model = make_model()
    model.load_state_dict(ranks[0]["initial"])
    model.double().train()
    features = model(torch.cat([views_a[ids], views_b[ids]]).double())
    z_a, z_b = model.head(features).chunk(2)
    loss = nt_xent_official_reference(z_a, z_b, model.hparams.temperature)
    loss.backward()

    n = WORLD * PER_RANK
    for r, rank in enumerate(ranks):
        mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
        expected = torch.cat([features[:n][mine], features[n:][mine]])
        assert_near(rank["features"], expected, 1e-4, f"rank {r} features")  # measured 4e-6
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, loss.float(), rtol=1e-5, atol=1e-6)

    # running statistics: bit-identical on both ranks, and the global batch's (momentum 0.1
    # of the global mean and unbiased variance: the batch statistics themselves)
    buffers = batchnorm_buffers(ranks[0]["buffers"])
    assert len(buffers) == 2 * (20 + 3)  # ResNet-18's 20 BatchNorms and the head's 3
    for name, value in batchnorm_buffers(ranks[1]["buffers"]).items():
        assert torch.equal(value, buffers[name]), name
    reference = batchnorm_buffers(model.state_dict())
    for name, value in buffers.items():
        assert_near(value, reference[name], 1e-4, name)  # measured at most 1e-6

    for name, param in model.named_parameters():  # DDP-averaged gradients
        for r, rank in enumerate(ranks):
            assert_near(rank["grads"][name], param.grad, 1e-3, f"rank {r} {name}")  # 2e-5


@pytest.mark.parametrize(
    "plugins",
    [None, Namespace(class_path="lightning.pytorch.plugins.TorchCheckpointIO"), []],
    ids=["none", "one", "list"],
)
def test_cli_turns_sync_batchnorm_into_the_plugin_keeping_other_plugins(plugins):
    trainer = Namespace(sync_batchnorm=True, plugins=plugins)
    global_batchnorm(trainer)
    kept = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
    assert trainer.sync_batchnorm is False  # Lightning refuses the flag with another LayerSync
    assert trainer.plugins == [*kept, Namespace(class_path=GLOBAL)]

    untouched = Namespace(sync_batchnorm=False, plugins=plugins)
    global_batchnorm(untouched)
    assert untouched == Namespace(sync_batchnorm=False, plugins=plugins)
