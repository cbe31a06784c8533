import math

import pytest
import torch
from torch import nn

from simclr_lightning import LARS
from simclr_lightning.optim import param_groups, scaled_learning_rate
from simclr_lightning.schedule import warmup_cosine
from tests.reference import cosine_schedule_reference, lars_reference


@pytest.mark.parametrize("adapt", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_lars_matches_reference_over_several_steps(adapt, weight_decay):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 5, generator=gen)
    grads = [torch.randn(7, 5, generator=gen) for _ in range(4)]
    p = nn.Parameter(w0.clone())
    opt = LARS(
        [{"params": [p], "weight_decay": weight_decay, "lars_adaptation": adapt}],
        lr=0.5,
        momentum=0.9,
        eta=0.02,
    )
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = lars_reference(w0, grads, 0.5, 0.9, weight_decay, 0.02, adapt)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_lars_zero_weights_fall_back_to_plain_rate():
    p = nn.Parameter(torch.zeros(3))
    opt = LARS([p], lr=0.1, momentum=0.0, eta=0.001)
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.1))


def test_bn_and_bias_are_excluded_from_decay_and_adaptation():
    from simclr_lightning import SimCLR

    model = SimCLR(backbone="resnet18", head_hidden_dim=32, head_output_dim=8)
    groups = param_groups(model, weight_decay=1e-4)
    decay_ids = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        is_bn_or_bias = isinstance(module, nn.modules.batchnorm._BatchNorm) or name.endswith("bias")
        assert (id(p) not in decay_ids) == is_bn_or_bias, name
    assert groups[1]["weight_decay"] == 0 and groups[1]["lars_adaptation"] is False
    n_params = sum(1 for _ in model.parameters())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_params


def test_learning_rate_scaling_rules():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_learning_rate(0.3, 512, "none") == 0.3
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_learning_rate(0.3, 512, "log")


@pytest.mark.parametrize("warmup,total,final", [(10, 100, 0.0), (0, 50, 0.1), (5, 5, 0.0)])
def test_warmup_cosine_schedule(warmup, total, final):
    values = [warmup_cosine(s, warmup, total, final) for s in range(total + 1)]
    for s, v in enumerate(values):
        assert v == pytest.approx(cosine_schedule_reference(s, warmup, total, final))
    if warmup:
        assert values[warmup - 1] == pytest.approx(1.0)
        assert all(a < b for a, b in zip(values[:warmup], values[1:warmup], strict=False))
    after = values[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert values[-1] == pytest.approx(final if total > warmup else 1.0)
    if total - warmup >= 2 and (total - warmup) % 2 == 0:
        mid = warmup + (total - warmup) // 2
        assert values[mid] == pytest.approx(final + (1 - final) / 2)
    assert not math.isnan(sum(values))


def lars_groups(foreach: bool, nesterov: bool) -> tuple[list[nn.Parameter], LARS]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (5,), (3, 2, 2), (4,)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    params[2].data.zero_()  # a zero weight: trust ratio 1
    groups = [
        {"params": params[:3], "weight_decay": 1e-2, "lars_adaptation": True},
        {"params": params[3:], "weight_decay": 0.0, "lars_adaptation": False},
    ]
    return params, LARS(groups, lr=0.3, momentum=0.9, eta=0.02, nesterov=nesterov, foreach=foreach)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_multi_tensor_step_equals_the_loop_and_the_reference(nesterov):
    runs = {}
    for foreach in (False, True):
        params, opt = lars_groups(foreach, nesterov)
        start = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(4)
        grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
        grads[1][0].zero_()  # a zero gradient: trust ratio 1
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        runs[foreach] = [p.detach().clone() for p in params]
    for a, b in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if not nesterov:  # the float64 formula, parameter by parameter
        for i, (adapt, wd) in enumerate([(True, 1e-2)] * 3 + [(False, 0.0)]):
            ref = lars_reference(start[i], [g[i] for g in grads], 0.3, 0.9, wd, 0.02, adapt)
            torch.testing.assert_close(runs[True][i].double(), ref, rtol=1e-5, atol=1e-6)
