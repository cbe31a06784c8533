"""SupConLoss against a float64 loop written from Khosla et al. (2020), eq. 2."""

from __future__ import annotations

import pytest
import torch

from simclr_lightning import NTXentLoss, SupConLoss
from tests.device_reads import DeviceReads
from tests.reference import nt_xent_official_reference, nt_xent_reference, supcon_reference

LABELS = {
    "classes": [0, 1, 0, 2, 1, 0, 2, 2],
    "one-class": [3] * 8,
    "unlabeled-mixed": [0, -1, 0, -1, 1, 1, -1, 0],
}


@pytest.mark.parametrize("labels", list(LABELS.values()), ids=list(LABELS))
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_loss_and_gradients_match_the_paper(labels, temperature):
    gen = torch.Generator().manual_seed(len(set(labels)))
    z_a = torch.randn(8, 12, generator=gen, requires_grad=True)
    z_b = torch.randn(8, 12, generator=gen, requires_grad=True)
    loss = SupConLoss(temperature)(z_a, z_b, torch.tensor(labels))
    ga, gb = torch.autograd.grad(loss, (z_a, z_b))

    ref_a = z_a.detach().double().requires_grad_()
    ref_b = z_b.detach().double().requires_grad_()
    ref = supcon_reference(ref_a, ref_b, labels, temperature)
    ra, rb = torch.autograd.grad(ref, (ref_a, ref_b))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("labels", [list(range(7)), [-1] * 7], ids=["distinct", "unlabeled"])
def test_with_no_shared_labels_it_is_nt_xent(labels):
    gen = torch.Generator().manual_seed(5)
    z_a, z_b = torch.randn(7, 10, generator=gen), torch.randn(7, 10, generator=gen)
    supcon, supcon_stats = SupConLoss(0.2).forward_with_stats(z_a, z_b, torch.tensor(labels))
    ntxent, ntxent_stats = NTXentLoss(0.2).forward_with_stats(z_a, z_b)
    torch.testing.assert_close(supcon.double(), nt_xent_reference(z_a, z_b, 0.2))
    torch.testing.assert_close(supcon, ntxent)
    for key, value in ntxent_stats.items():
        torch.testing.assert_close(supcon_stats[key], value, msg=key)
    # scaled as NT-Xent is, so a SimCLR recipe keeps its learning rate with either loss
    summed = SupConLoss(0.2, reduction="sum_of_views")(z_a, z_b, torch.tensor(labels))
    torch.testing.assert_close(summed.double(), nt_xent_official_reference(z_a, z_b, 0.2))


def test_class_statistics_match_brute_force():
    gen = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 1, 1, 2])
    z_a, z_b = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    _, stats = SupConLoss(0.5).forward_with_stats(z_a, z_b, labels)
    z = torch.cat([z_a, z_b]).double()
    y = torch.cat([labels, labels]).tolist()
    pos, neg, hits = [], [], 0
    for i in range(10):
        sims = {j: torch.nn.functional.cosine_similarity(z[i], z[j], dim=0) for j in range(10)}
        del sims[i]
        pos += [s for j, s in sims.items() if y[j] == y[i]]
        neg += [s for j, s in sims.items() if y[j] != y[i]]
        hits += y[max(sims, key=lambda j: sims[j])] == y[i]
    assert stats["pos_cos"].item() == pytest.approx(float(sum(pos) / len(pos)), abs=1e-6)
    assert stats["neg_cos"].item() == pytest.approx(float(sum(neg) / len(neg)), abs=1e-6)
    assert stats["contrastive_acc"].item() == pytest.approx(hits / 10)


def brute_force_statistics(z_a, z_b, labels: list[int]) -> tuple[float, float]:
    """Mean cosine over every (anchor, other embedding) pair of the same label and of another
    label (0 without any), one pair at a time in float64; -1 marks an image of its own."""
    n = len(labels)
    z = torch.cat([z_a, z_b]).double()
    ids = [("image", i) if label < 0 else ("class", label) for i, label in enumerate(labels)]
    ids = ids + ids
    pos, neg = [], []
    for i in range(2 * n):
        for j in range(2 * n):
            if i != j:
                cos = float(torch.nn.functional.cosine_similarity(z[i], z[j], dim=0))
                (pos if ids[i] == ids[j] else neg).append(cos)
    return sum(pos) / len(pos), sum(neg) / len(neg) if neg else 0.0


@pytest.mark.parametrize("labels", list(LABELS.values()), ids=list(LABELS))
def test_statistics_match_brute_force_and_read_nothing_back_on_the_host(labels):
    """Logged every step: a boolean-mask index or an ``if`` on a device tensor would make the
    host wait for the GPU each time."""
    gen = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    y = torch.tensor(labels)
    reads = DeviceReads(z_a, z_b, y)
    with reads:
        _, stats = SupConLoss(0.5).forward_with_stats(z_a, z_b, y)
    assert dict(reads.counts) == {}
    pos_cos, neg_cos = brute_force_statistics(z_a, z_b, labels)
    assert stats["pos_cos"].item() == pytest.approx(pos_cos, abs=1e-6)
    assert stats["neg_cos"].item() == pytest.approx(neg_cos, abs=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="model.temperature=0"):
        SupConLoss(0.0)
    with pytest.raises(ValueError, match="labels"):
        SupConLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="data.batch_size"):
        SupConLoss()(torch.randn(1, 3), torch.randn(1, 3), torch.zeros(1))


# -- under real DDP: 2 processes over gloo, each with its share of the batch ----------------------

WORLD, PER_RANK = 2, 4


def _batch():
    gen = torch.Generator().manual_seed(11)
    x_a = torch.randn(WORLD * PER_RANK, 10, generator=gen)
    x_b = torch.randn(WORLD * PER_RANK, 10, generator=gen)
    labels = torch.tensor([0, 1, -1, 2, 1, 0, 2, -1])  # classes shared across the two ranks
    return x_a, x_b, labels


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x_a, x_b, labels = _batch()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        z_a, z_b = model(torch.cat([x_a[mine], x_b[mine]])).chunk(2)
        loss = SupConLoss(0.3)(z_a, z_b, labels[mine])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_equals_one_process_holding_the_whole_batch(tmp_path):
    from tests.ddp_helpers import spawn_gloo

    spawn_gloo(_ddp_worker, WORLD, lambda init: (init, str(tmp_path)), tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = _model()
    x_a, x_b, labels = _batch()
    z_a, z_b = model(torch.cat([x_a, x_b])).chunk(2)
    loss = SupConLoss(0.3, gather_distributed=False)(z_a, z_b, labels)
    loss.backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach())
    for r in ranks:  # DDP averaged the gradients of the per-rank means
        for got, want in zip(r["grads"], [p.grad for p in model.parameters()], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_supcon_on_images_without_labels_is_refused_before_training(tmp_path):
    """Every image of an unlabelled folder is label -1, its own class: SupCon silently became
    NT-Xent."""
    import numpy as np
    from PIL import Image

    from simclr_lightning import ImageFolderDataModule, SettingError, SimCLR, SimCLRAugmentation
    from tests.helpers import quiet_trainer

    (tmp_path / "train").mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "train" / f"{i}.png")
    data = ImageFolderDataModule(
        str(tmp_path), SimCLRAugmentation(image_size=8), batch_size=2, num_workers=0
    )
    model = SimCLR(backbone="timm:test_resnet", cifar_stem=False, loss="supcon")
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(SettingError, match=r"model\.loss='supcon' needs labelled images"):
        trainer.fit(model, data)
    assert trainer.global_step == 0
