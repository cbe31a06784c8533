"""Gradient caching (SimCLR(grad_cache_chunks=k)) against a float64 reference that runs the
encoder chunk by chunk with full autograd and the paper's loss on the whole batch, alone and
under real 2-process DDP; and Lightning's clipping and precision around it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from simclr_lightning import SettingError, SimCLR
from tests.ddp_helpers import FreezeBatchNorm, run_ddp_script
from tests.ddp_lightning_script import SaveStep, make_data, make_model, rank_rows
from tests.helpers import quiet_trainer
from tests.reference import nt_xent_official_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def chunk_by_chunk_reference(
    model: SimCLR, batches: list[tuple[Tensor, Tensor]], chunks: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """float64: each chunk of (both views of) each per-device batch through the encoder with
    full autograd, BatchNorm on that chunk's statistics; the official loss (the default
    loss_reduction, twice eq. 1) on all embeddings at once."""
    model = copy.deepcopy(model).double().train()
    z_a, z_b = [], []
    for a, b in batches:
        for chunk_a, chunk_b in zip(a.tensor_split(chunks), b.tensor_split(chunks), strict=True):
            if len(chunk_a):
                z = model.head(model.backbone(torch.cat([chunk_a, chunk_b]).double()))
                z_a.append(z[: len(chunk_a)])
                z_b.append(z[len(chunk_a) :])
    loss = nt_xent_official_reference(torch.cat(z_a), torch.cat(z_b), model.hparams.temperature)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def batchnorm_after_chunks(model: SimCLR, a: Tensor, b: Tensor, chunks: int) -> dict:
    """BatchNorm buffers after one train-mode pass per chunk: updated once per chunk."""
    model = copy.deepcopy(model).double().train()
    with torch.no_grad():
        for chunk_a, chunk_b in zip(a.tensor_split(chunks), b.tensor_split(chunks), strict=True):
            if len(chunk_a):
                model.head(model.backbone(torch.cat([chunk_a, chunk_b]).double()))
    return {n: buf for n, buf in model.named_buffers() if "running" in n or "num_batches" in n}


def assert_same_step(saved: dict, loss: Tensor, grads: dict[str, Tensor], tol: float) -> None:
    torch.testing.assert_close(saved["loss"], loss, rtol=tol, atol=tol)
    assert saved["grads"].keys() == grads.keys()
    for name, ref in grads.items():
        torch.testing.assert_close(saved["grads"][name], ref, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(("pairs", "chunks"), [(7, 3), (2, 4)])
def test_gradients_and_batchnorm_equal_chunk_by_chunk_reference(tmp_path, pairs, chunks):
    """7 pairs in chunks of 3, 2, 2; and fewer pairs than chunks (a short last batch)."""
    gen = torch.Generator().manual_seed(pairs)
    a, b = torch.randn(pairs, 3, 8, 8, generator=gen), torch.randn(pairs, 3, 8, 8, generator=gen)
    model = make_model(grad_cache_chunks=chunks)
    loss, grads = chunk_by_chunk_reference(model, [(a, b)], chunks)
    want_buffers = batchnorm_after_chunks(model, a, b, chunks)

    save = SaveStep(tmp_path, initial=model.state_dict())
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, precision="64-true", callbacks=[save])
    samples = [((a[i], b[i]), 0) for i in range(pairs)]
    trainer.fit(model, DataLoader(samples, batch_size=pairs))
    saved = torch.load(tmp_path / "rank0_of1.pt")
    assert_same_step(saved, loss, grads, tol=1e-10)
    for name, want in want_buffers.items():  # not updated a second time by the recomputation
        torch.testing.assert_close(saved["buffers"][name], want, rtol=1e-12, atol=1e-12)
    assert saved["buffers"]["backbone.bn1.num_batches_tracked"] == min(pairs, chunks)


def fit_update(chunks: int, precision: str, clip: float | None) -> Tensor:
    """Two optimizer steps, clipped, BatchNorm frozen (so the chunks change nothing but the
    memory): the change of all weights, flattened. (SimCLR refuses gradient accumulation.)"""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, 3, 8, 8, generator=gen), torch.randn(24, 3, 8, 8, generator=gen)
    model = make_model(grad_cache_chunks=chunks)
    before = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    trainer = quiet_trainer(
        max_steps=2,
        limit_val_batches=0,
        precision=precision,
        gradient_clip_val=clip,
        callbacks=[FreezeBatchNorm()],
    )
    trainer.fit(model, DataLoader([((a[i], b[i]), 0) for i in range(24)], batch_size=6))
    return torch.cat([p.detach().double().flatten() for p in model.parameters()]) - before


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "tol"), [("64-true", 1e-9), ("bf16-mixed", 0.05)])
def test_clipping_and_precision_work_as_without_chunks(precision, tol):
    """Relative to the update's size: bf16 rounding alone makes about 2% here."""
    whole = fit_update(chunks=1, precision=precision, clip=0.05)
    cached = fit_update(chunks=3, precision=precision, clip=0.05)
    assert (cached - whole).norm() <= tol * whole.norm()
    if precision == "64-true":  # the clip was active: without it the update differs
        unclipped = fit_update(chunks=3, precision=precision, clip=None)
        assert (unclipped - whole).norm() > 0.1 * whole.norm()


@pytest.mark.slow
def test_ddp_gradients_equal_chunk_by_chunk_reference(tmp_path):
    """2 processes, 4 pairs each in 2 chunks, BatchNorm on batch statistics: DDP's averaged
    gradients equal the gradient of the loss over the global batch, with every chunk of every
    rank normalised by its own statistics; each rank's buffers updated once per chunk."""
    chunks = 2
    ranks = run_ddp_script(
        "ddp_lightning_script.py",
        2,
        tmp_path / "ddp",
        *("--grad-cache-chunks", str(chunks), "--precision", "64-true", "--batchnorm", "train"),
    )
    model = make_model(grad_cache_chunks=chunks)
    model.load_state_dict(ranks[0]["initial"])
    views_a, views_b = make_data()
    per_rank = [(views_a[rank_rows(r)], views_b[rank_rows(r)]) for r in range(len(ranks))]
    loss, grads = chunk_by_chunk_reference(model, per_rank, chunks)
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    for rank, saved in enumerate(ranks):
        assert_same_step({**saved, "loss": mean_loss}, loss, grads, tol=1e-10)
        want_buffers = batchnorm_after_chunks(model, *per_rank[rank], chunks)
        for name, want in want_buffers.items():
            torch.testing.assert_close(saved["buffers"][name], want, rtol=1e-12, atol=1e-12)


def test_bad_chunk_count_is_rejected():
    with pytest.raises(SettingError, match=r"^model\.grad_cache_chunks=0 is invalid: must be >= 1"):
        SimCLR(grad_cache_chunks=0)
