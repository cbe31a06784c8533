"""NT-Xent under real DDP (2 CPU processes, gloo) equals one process on the whole batch."""

from __future__ import annotations

import pytest
import torch

from simclr_lightning import NTXentLoss
from tests.ddp_helpers import (
    global_batch,
    mlp,
    run_ddp_script,
    run_ddp_script_runs,
    spawn_gloo,
    torch_ddp_worker,
)
from tests.reference import nt_xent_health_reference, nt_xent_reference

WORLD, PER_RANK, TEMPERATURE = 2, 5, 0.3


MODES = ["correct", "nograd", "localgrad"]


@pytest.fixture(scope="module")
def torch_ddp(tmp_path_factory) -> dict[str, list[dict]]:
    """Each rank's step with the library's gather and with each broken one: one spawn of the
    2 processes (each start imports torch) for the three."""
    out = tmp_path_factory.mktemp("torch_ddp")
    spawn_gloo(
        torch_ddp_worker,
        WORLD,
        lambda init: (WORLD, init, str(out), MODES, PER_RANK, TEMPERATURE),
        out,
    )
    return {m: [torch.load(out / f"rank{r}_{m}.pt") for r in range(WORLD)] for m in MODES}


def single_process_reference() -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = mlp(seed=0)
    x_a, x_b = global_batch(WORLD, PER_RANK, seed=1)
    z_a, z_b = model(torch.cat([x_a, x_b])).chunk(2)
    loss = NTXentLoss(TEMPERATURE, gather_distributed=False)(z_a, z_b)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def matches(results: list[dict], loss: torch.Tensor, grads: list[torch.Tensor]) -> bool:
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    same_loss = torch.allclose(mean_loss, loss, rtol=1e-5, atol=1e-6)
    same_grads = all(
        torch.allclose(g, ref, rtol=1e-4, atol=1e-6)
        for r in results
        for g, ref in zip(r["grads"], grads, strict=True)
    )
    return same_loss and same_grads


def float64_reference() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The paper's loss (tests/reference.py) on the whole batch, model and data in float64."""
    model = mlp(seed=0).double()
    x_a, x_b = global_batch(WORLD, PER_RANK, seed=1)
    z_a, z_b = model(torch.cat([x_a, x_b]).double()).chunk(2)
    loss = nt_xent_reference(z_a, z_b, TEMPERATURE)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], z_a.detach(), z_b.detach()


def test_torch_ddp_equals_single_process(torch_ddp):
    loss, grads = single_process_reference()
    results = torch_ddp["correct"]
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, loss, rtol=1e-5, atol=1e-6)
    for r in results:
        for g, ref in zip(r["grads"], grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)

    # ... and the float64 reference to 1e-5, loss, gradients and each rank's statistics
    loss64, grads64, z_a, z_b = float64_reference()
    torch.testing.assert_close(mean_loss.double(), loss64, rtol=1e-5, atol=1e-5)
    for rank, r in enumerate(results):
        for g, ref in zip(r["grads"], grads64, strict=True):
            torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-5)
        mine = range(rank * PER_RANK, (rank + 1) * PER_RANK)
        anchors = [*mine, *(i + WORLD * PER_RANK for i in mine)]
        want = nt_xent_health_reference(z_a, z_b, anchors)
        for name, value in want.items():
            assert r["stats"][name].item() == pytest.approx(value, abs=1e-5), (rank, name)


@pytest.mark.parametrize("mode", ["nograd", "localgrad"])
def test_torch_ddp_check_catches_a_gather_that_drops_gradients(torch_ddp, mode):
    loss, grads = single_process_reference()
    results = torch_ddp[mode]
    # The forward is the same, so the loss still agrees: only gradients reveal the bug.
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), loss)
    assert not matches(results, loss, grads)


@pytest.mark.slow
def test_lightning_ddp_equals_single_process(tmp_path):
    (single,) = run_ddp_script("ddp_lightning_script.py", 1, tmp_path / "1dev")
    # the library's gather and one that drops gradients, one after the other in one launch
    runs = {"correct": ["--gather", "correct"], "nograd": ["--gather", "nograd"]}
    two = run_ddp_script_runs("ddp_lightning_script.py", 2, tmp_path / "2dev", runs)
    ranks = two["correct"]
    assert [r["world"] for r in ranks] == [2, 2]
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-5, atol=1e-6)
    for r in ranks:  # every rank logs the global batch's loss, with no barrier in the step
        torch.testing.assert_close(r["logged"], single["loss"], rtol=1e-5, atol=1e-6)
        assert r["step_barriers"] == 0 and r["sync_warnings"] == []
    assert single["grads"].keys() == ranks[0]["grads"].keys()
    for name, ref in single["grads"].items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], ref, rtol=1e-3, atol=1e-5, msg=name)

    broken = two["nograd"]
    differs = [
        name
        for name, ref in single["grads"].items()
        if not torch.allclose(broken[0]["grads"][name], ref, rtol=1e-3, atol=1e-5)
    ]
    assert differs, "a gather without gradients went unnoticed"
