import math

import pytest
import torch

from simclr_lightning import NTXentLoss
from tests.reference import nt_xent_reference


@pytest.mark.parametrize("n", [2, 3, 8, 17])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_loss_and_gradients_match_paper_formula(n, temperature):
    gen = torch.Generator().manual_seed(n * 100 + int(temperature * 100))
    z_a = torch.randn(n, 16, generator=gen, requires_grad=True)
    z_b = torch.randn(n, 16, generator=gen, requires_grad=True)
    loss = NTXentLoss(temperature)(z_a, z_b)
    ga, gb = torch.autograd.grad(loss, (z_a, z_b))

    ref_a = z_a.detach().double().requires_grad_()
    ref_b = z_b.detach().double().requires_grad_()
    ref = nt_xent_reference(ref_a, ref_b, temperature)
    ra, rb = torch.autograd.grad(ref, (ref_a, ref_b))

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-6)


def test_identical_views_far_apart_give_near_zero_loss():
    # Orthogonal pairs that agree perfectly: the positive dominates at low temperature.
    z = torch.eye(4)
    assert NTXentLoss(0.05)(z, z.clone()) < 1e-6
    # All embeddings equal: every candidate is equally likely, loss = log(2N - 1).
    ones = torch.ones(5, 3)
    assert math.isclose(NTXentLoss(0.5)(ones, ones).item(), math.log(9), rel_tol=1e-6)


def test_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen)
    loss_fn = NTXentLoss(0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(z_a.bfloat16(), z_b.bfloat16())
    assert low.dtype == torch.float32
    ref = nt_xent_reference(z_a.bfloat16().double(), z_b.bfloat16().double(), 0.1)
    torch.testing.assert_close(low.double(), ref, rtol=1e-5, atol=1e-5)


def test_health_signals_match_brute_force():
    gen = torch.Generator().manual_seed(3)
    n = 6
    z_a, z_b = torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)
    z_b[:3] = z_a[:3] + 0.01 * torch.randn(3, 8, generator=gen)  # three easy positives
    _, stats = NTXentLoss(0.5).forward_with_stats(z_a, z_b)
    z = torch.nn.functional.normalize(torch.cat([z_a, z_b]).double(), dim=1)
    pos, neg, hits = [], [], 0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        pos.append(float(z[i] @ z[p]))
        neg += [float(z[i] @ z[j]) for j in others if j != p]
        hits += max(others, key=lambda j: float(z[i] @ z[j])) == p
    assert stats["pos_cos"].item() == pytest.approx(sum(pos) / len(pos), abs=1e-5)
    assert stats["neg_cos"].item() == pytest.approx(sum(neg) / len(neg), abs=1e-5)
    assert stats["contrastive_acc"].item() == pytest.approx(hits / (2 * n))
    assert stats["z_std"].item() == pytest.approx(float(z.std(dim=0).mean()), abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_bad_temperature_is_rejected(temperature):
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature)


def test_single_image_batch_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        NTXentLoss()(torch.randn(1, 4), torch.randn(1, 4))


def test_mismatched_views_are_rejected():
    with pytest.raises(ValueError, match="equal shape"):
        NTXentLoss()(torch.randn(4, 4), torch.randn(3, 4))
