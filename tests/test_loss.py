import math

import pytest
import torch

from simclr_lightning import NTXentLoss, SettingError
from tests.reference import (
    nt_xent_health_reference,
    nt_xent_official_reference,
    nt_xent_reference,
)


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


@pytest.mark.parametrize("block_size", [1024, 3])
@pytest.mark.parametrize("n", [2, 5, 9])
def test_sum_of_views_matches_the_official_code(n, block_size):
    """google-research/simclr adds the two views' cross entropies (each a mean over N): the
    scale its LARS hyperparameters were tuned with."""
    gen = torch.Generator().manual_seed(n)
    z_a = torch.randn(n, 16, generator=gen, requires_grad=True)
    z_b = torch.randn(n, 16, generator=gen, requires_grad=True)
    loss = NTXentLoss(0.5, block_size=block_size, reduction="sum_of_views")(z_a, z_b)
    ga, gb = torch.autograd.grad(loss, (z_a, z_b))

    ref_a = z_a.detach().double().requires_grad_()
    ref_b = z_b.detach().double().requires_grad_()
    ref = nt_xent_official_reference(ref_a, ref_b, 0.5)
    ra, rb = torch.autograd.grad(ref, (ref_a, ref_b))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-6)


def test_bad_reduction_is_named():
    with pytest.raises(SettingError, match=r"^model\.loss_reduction='sum' is invalid: must be one"):
        NTXentLoss(reduction="sum")


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


@pytest.mark.parametrize("block_size", [1024, 1, 5])
def test_health_signals_match_brute_force(block_size):
    gen = torch.Generator().manual_seed(3)
    n = 6
    z_a, z_b = torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)
    z_b[:3] = z_a[:3] + 0.01 * torch.randn(3, 8, generator=gen)  # three easy positives
    _, stats = NTXentLoss(0.5, block_size=block_size).forward_with_stats(z_a, z_b)
    want = nt_xent_health_reference(z_a, z_b)
    assert stats["pos_cos"].item() == pytest.approx(want["pos_cos"], abs=1e-5)
    assert stats["neg_cos"].item() == pytest.approx(want["neg_cos"], abs=1e-5)
    assert stats["contrastive_acc"].item() == pytest.approx(want["contrastive_acc"])
    assert stats["z_std"].item() == pytest.approx(want["z_std"], abs=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 7, 14, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_loss_and_gradients_equal_float64_reference_in_any_tiling(block_size, dtype):
    """Tiles of 1 row, tiles that split the two views unevenly (3, 7 of 14 anchors), one tile."""
    gen = torch.Generator().manual_seed(block_size)
    z_a = torch.randn(7, 16, generator=gen, dtype=dtype, requires_grad=True)
    z_b = torch.randn(7, 16, generator=gen, dtype=dtype, requires_grad=True)
    loss, _ = NTXentLoss(0.2, block_size=block_size).forward_with_stats(z_a, z_b)
    ga, gb = torch.autograd.grad(loss, (z_a, z_b))
    ref_a = z_a.detach().double().requires_grad_()
    ref_b = z_b.detach().double().requires_grad_()
    ref = nt_xent_reference(ref_a, ref_b, 0.2)
    ra, rb = torch.autograd.grad(ref, (ref_a, ref_b))
    assert loss.dtype == dtype and ga.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(ga.double(), ra, rtol=tol, atol=tol)
    torch.testing.assert_close(gb.double(), rb, rtol=tol, atol=tol)


def test_gradients_in_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(1)
    z_a = torch.randn(6, 8, generator=gen).bfloat16().requires_grad_()
    z_b = torch.randn(6, 8, generator=gen).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = NTXentLoss(0.1, block_size=4)(z_a, z_b)
    ga, gb = torch.autograd.grad(loss, (z_a, z_b))
    ref_a = z_a.detach().double().requires_grad_()
    ref_b = z_b.detach().double().requires_grad_()
    ra, rb = torch.autograd.grad(nt_xent_reference(ref_a, ref_b, 0.1), (ref_a, ref_b))
    # the only bf16 rounding left is that of the returned gradient itself
    torch.testing.assert_close(ga.double(), ra.bfloat16().double(), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(gb.double(), rb.bfloat16().double(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("with_stats", [False, True])
def test_autograd_keeps_no_similarity_matrix(with_stats):
    """What the backward pass holds is O(N D): no tensor of 2N x 2N similarities is saved."""
    n, dim = 64, 8
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(n, dim, generator=gen, requires_grad=True)
    z_b = torch.randn(n, dim, generator=gen, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = NTXentLoss(0.5, block_size=16).forward_with_stats(z_a, z_b, with_stats)
    assert saved and max(saved) <= 2 * n * dim < (2 * n) ** 2
    loss.backward()


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


def test_bad_block_size_is_rejected():
    with pytest.raises(SettingError, match=r"^model\.loss_block_size=0 is invalid: must be >= 1"):
        NTXentLoss(block_size=0)
