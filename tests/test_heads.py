"""The projection head and the encoder's initialisation against google-research/simclr.

Numbers written down from the official code (model_util.py, resnet.py at its last commit):
``projection_head`` builds ``num_proj_layers`` (default 3) ``linear_layer``s with
``use_bn=True``; the middle ones have ``dim = mid_dim = hiddens.shape[-1]`` (the encoder's
width) with BN centre and scale, then ReLU; the last has ``proj_out_dim`` (128) units, BN with
``center=use_bias=False`` and no ReLU. ``linear_layer``'s dense layer has
``use_bias=use_bias and not use_bn`` (never a bias here) and
``kernel_initializer=random_normal(stddev=.01)``. Residual blocks end with
``batch_norm_relu(..., init_zero=True)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from simclr_lightning import SimCLR
from simclr_lightning.heads import ProjectionHead

# (layers, encoder width) -> the official layer list: (kind, in, out) / (bn kind, width)
OFFICIAL = {
    (2, 512): [
        ("linear", 512, 512), ("bn", 512), ("relu",),
        ("linear", 512, 128), ("bn-scale", 128),
    ],
    (3, 2048): [
        ("linear", 2048, 2048), ("bn", 2048), ("relu",),
        ("linear", 2048, 2048), ("bn", 2048), ("relu",),
        ("linear", 2048, 128), ("bn-scale", 128),
    ],
}  # fmt: skip


def describe(head: nn.Module) -> list[tuple]:
    out = []
    for m in head.net:
        if isinstance(m, nn.Linear):
            assert m.bias is None  # Linear -> BN: no dense bias
            out.append(("linear", m.in_features, m.out_features))
        elif isinstance(m, nn.BatchNorm1d):
            assert m.weight is not None and m.eps == 1e-5 and m.momentum == pytest.approx(0.1)
            out.append(("bn" if m.bias is not None else "bn-scale", m.num_features))
        else:
            assert isinstance(m, nn.ReLU)
            out.append(("relu",))
    return out


@pytest.mark.parametrize(
    ("layers", "backbone", "width"), [(2, "resnet18", 512), (3, "resnet50", 2048)]
)
def test_default_head_is_the_official_one(layers, backbone, width):
    model = SimCLR(backbone=backbone, cifar_stem=False, head_layers=layers)
    assert describe(model.head) == OFFICIAL[(layers, width)]


def test_head_weights_start_from_normal_0_01():
    head = ProjectionHead(512, 512, 128, num_layers=3)
    weights = torch.cat([m.weight.flatten() for m in head.net if isinstance(m, nn.Linear)])
    assert abs(weights.mean().item()) < 1e-4
    assert weights.std().item() == pytest.approx(0.01, rel=0.01)


def test_output_batchnorm_has_scale_and_no_shift():
    head = ProjectionHead(16, 8, 4, num_layers=2)
    with torch.no_grad():
        head.net[-1].weight.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    x = torch.randn(64, 16) * 3 + 1
    pre = head.net[:-1](x)  # what the last BN normalises
    # batch_norm(center=False): (x - batch mean) / sqrt(batch var + 1e-5) * scale, no shift
    want = (pre - pre.mean(0)) / torch.sqrt(pre.var(0, unbiased=False) + 1e-5) * head.net[-1].weight
    torch.testing.assert_close(head.train()(x), want, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in head.net[-1].named_parameters()] == ["weight"]


def test_first_layers_are_simclr_v2s_fine_tuning_inputs():
    head = ProjectionHead(16, 8, 4, num_layers=3).eval()
    x = torch.randn(5, 16)
    h1 = torch.relu(head.net[1](head.net[0](x)))
    torch.testing.assert_close(head.first_layers(1)(x), h1)
    torch.testing.assert_close(head.first_layers(3)(x), head(x))
    assert len(head.first_layers(0)) == 0
    assert [head.width_after(k) for k in range(4)] == [16, 8, 8, 4]
    with pytest.raises(ValueError, match="model.head_layers=4"):
        head.first_layers(4)


@pytest.mark.parametrize(
    ("backbone", "block", "last_bn"),
    [("resnet18", BasicBlock, "bn2"), ("resnet50", Bottleneck, "bn3")],
)
def test_residual_blocks_start_as_the_identity(backbone, block, last_bn):
    model = SimCLR(backbone=backbone, cifar_stem=False)
    blocks = [m for m in model.backbone.modules() if isinstance(m, block)]
    assert blocks and all(getattr(b, last_bn).weight.abs().sum() == 0 for b in blocks)
    identity_block = next(b for b in blocks if b.downsample is None).eval()
    x = torch.randn(2, identity_block.conv1.in_channels, 8, 8)
    torch.testing.assert_close(identity_block(x), torch.relu(x))  # init_zero: relu(shortcut)
    plain = SimCLR(backbone=backbone, cifar_stem=False, zero_init_residual=False)
    assert all(
        getattr(b, last_bn).weight.abs().sum() > 0
        for b in plain.backbone.modules()
        if isinstance(b, block)
    )


def test_defaults_are_the_official_cifar10_command():
    """google-research/simclr README, CIFAR-10: --train_batch_size=512 --train_epochs=1000
    --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 --resnet_depth=18
    --image_size=32 (so the CIFAR stem), run.py defaults: optimizer lars, momentum 0.9,
    learning_rate_scaling linear, warmup_epochs 10, num_proj_layers 3, proj_out_dim 128;
    lars_optimizer.py: eeta 0.001."""
    hp = SimCLR().hparams
    official = dict(
        backbone="resnet18", cifar_stem=True, zero_init_residual=True, head_layers=3,
        head_output_dim=128, head_output_bn=True, temperature=0.5, optimizer="lars",
        base_lr=1.0, lr_scaling="linear", weight_decay=1e-4, momentum=0.9, lars_eta=0.001,
        warmup_epochs=10, loss="ntxent",
    )  # fmt: skip
    assert {k: hp[k] for k in official} == official
    assert SimCLR().head.hidden_dim == 512  # mid_dim: the encoder's width


def test_every_head_and_init_option_is_a_cli_setting(capsys):
    from simclr_lightning.cli import cli_main
    from tests.helpers import REPO

    args = ["fit", "--config", str(REPO / "configs" / "cifar10.yaml"), "--print_config"]
    with pytest.raises(SystemExit):
        cli_main(args + ["--model.head_output_bn=false", "--model.head_layers=2"])
    printed = capsys.readouterr().out
    for setting in (
        "head_output_bn: false", "head_layers: 2", "head_hidden_dim: null",
        "zero_init_residual: true", "loss: ntxent", "timm_kwargs: null",
    ):  # fmt: skip
        assert setting in printed, setting
