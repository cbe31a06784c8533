"""timm encoders through ``backbone: timm:<name>``: built, trained, exported and reloaded."""

from __future__ import annotations

import sys

import pytest
import timm  # the `timm` and `dev` extras install it
import torch
from torch.utils.data import DataLoader

from simclr_lightning import LinearEval, SimCLR, export_backbone
from simclr_lightning.optim import param_groups
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n: int, size: int = 32) -> list:
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2, n, 3, size, size, generator=gen)
    return [((views[0, i], views[1, i]), i % 2) for i in range(n)]


def test_timm_encoder_trains_exports_and_reloads(tmp_path):
    model = SimCLR(backbone="timm:resnet10t", cifar_stem=False, optimizer="sgd", warmup_epochs=0)
    reference = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    assert model.feature_dim == reference.num_features == 512
    assert model.head.hidden_dim == 512
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, DataLoader(pairs(8), batch_size=8))
    trainer.save_checkpoint(tmp_path / "timm.ckpt")

    arch = export_backbone(tmp_path / "timm.ckpt", tmp_path / "encoder.pt")
    assert arch["backbone"] == "timm:resnet10t"
    reference.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True))  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), model.eval()(x))
        linear = LinearEval(str(tmp_path / "timm.ckpt"), num_classes=2, head_layers=1).eval()
        assert linear.feature_dim == 512
        torch.testing.assert_close(linear.backbone(x), model.backbone(x))


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "lcnet_050"])
def test_a_timm_encoder_with_pre_logits_gets_a_head_of_its_output_width(name):
    """These give num_features (288, 256) but output their pre-logits layer's 1024 or 1280
    features: the head was built for num_features and the first step failed. Reference: the
    width timm's own model outputs."""
    model = SimCLR(backbone=f"timm:{name}", cifar_stem=False, optimizer="sgd", warmup_epochs=0)
    reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        width = reference(torch.randn(2, 3, 32, 32)).shape[1]
    assert width != reference.num_features  # the case that went wrong
    assert model.feature_dim == width
    quiet_trainer(max_steps=1).fit(model, DataLoader(pairs(8), batch_size=8))


def test_timm_kwargs_reach_the_model():
    model = SimCLR(backbone="timm:test_vit", cifar_stem=False, timm_kwargs={"img_size": 32})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.feature_dim)


def test_a_vits_tokens_and_position_embedding_are_not_decayed():
    """timm lists them in no_weight_decay(), as its own optimizer factory exempts them; by
    shape alone (3-D) they were decayed and LARS-adapted. Reference: timm's list."""
    model = SimCLR(backbone="timm:test_vit", cifar_stem=False, timm_kwargs={"img_size": 32})
    listed = {f"backbone.{name}" for name in model.backbone.no_weight_decay()}
    shapes = {name: p.ndim for name, p in model.named_parameters()}
    want = {name for name, ndim in shapes.items() if ndim <= 1 or name in listed}
    assert {"backbone.cls_token", "backbone.pos_embed"} <= want
    names = {id(p): name for name, p in model.named_parameters()}
    _, no_decay = param_groups(model, weight_decay=1e-4)
    assert {names[id(p)] for p in no_decay["params"]} == want


def test_timm_errors_name_the_setting(monkeypatch):
    with pytest.raises(
        ValueError, match="model.cifar_stem=True is invalid: must be false for timm"
    ):
        SimCLR(backbone="timm:resnet10t")
    with pytest.raises(ValueError, match="model.backbone='timm:no_such_net' is not a timm model"):
        SimCLR(backbone="timm:no_such_net", cifar_stem=False)
    with pytest.raises(ValueError, match="model.timm_kwargs=.* empty for torchvision"):
        SimCLR(timm_kwargs={"img_size": 32})
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ValueError, match=r"needs timm: pip install 'simclr-lightning\[timm\]'"):
        SimCLR(backbone="timm:resnet10t", cifar_stem=False)
