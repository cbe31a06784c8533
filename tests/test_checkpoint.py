"""The exported encoder is a plain torchvision state dict, written atomically."""

from __future__ import annotations

import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from simclr_lightning.checkpoint import export_backbone, main
from simclr_lightning.errors import CheckpointError
from simclr_lightning.evaluation import LinearEval
from simclr_lightning.module import SimCLR
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def save_simclr_checkpoint(
    path: Path,
    cifar_stem: bool,
    in_channels: int,
    size: int = 16,
    cls: type = SimCLR,
    **model_kwargs,
) -> SimCLR:
    """One real SimCLR step on ``size`` px noise (so BatchNorm statistics are not the
    defaults), saved by Lightning; ``model_kwargs`` go to ``cls`` (e.g. a timm backbone)."""
    L.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2, 8, in_channels, size, size, generator=gen)
    pairs = [((views[0, i], views[1, i]), i % 3) for i in range(8)]
    model = cls(
        cifar_stem=cifar_stem,
        in_channels=in_channels,
        head_hidden_dim=32,
        head_output_dim=8,
        optimizer="sgd",
        warmup_epochs=0,
        **model_kwargs,
    )
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, DataLoader(pairs, batch_size=8))
    trainer.save_checkpoint(path)
    return model


@pytest.mark.parametrize(("cifar_stem", "in_channels"), [(True, 1), (False, 3)])
def test_export_loads_into_torchvision_and_gives_same_features(tmp_path, cifar_stem, in_channels):
    model = save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem, in_channels)
    arch = export_backbone(tmp_path / "simclr.ckpt", tmp_path / "out" / "encoder.pt")
    built = {k: arch[k] for k in ("backbone", "cifar_stem", "in_channels", "fc")}
    assert built == {
        "backbone": "resnet18",
        "cifar_stem": cifar_stem,
        "in_channels": in_channels,
        "fc": None,
    }

    # torchvision's ResNet-18 with the stem written out here, not by the library's apply_stem
    # (its stride and padding are not in the state dict, so a shared mistake would not show)
    net = torchvision.models.resnet18()
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    state = torch.load(tmp_path / "out" / "encoder.pt", weights_only=True)
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    net.fc = nn.Identity()
    x = torch.randn(4, in_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.backbone.eval()(x), rtol=0, atol=0)


def test_export_of_a_linear_eval_checkpoint_keeps_only_the_encoder(tmp_path):
    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=True, in_channels=3)
    linear = LinearEval(str(tmp_path / "simclr.ckpt"), num_classes=3)
    trainer = quiet_trainer(max_steps=1)
    data = [(torch.randn(3, 16, 16), i % 3) for i in range(8)]
    trainer.fit(linear, DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "linear.ckpt")
    export_backbone(tmp_path / "linear.ckpt", tmp_path / "encoder.pt")
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert state.keys() == linear.backbone.state_dict().keys()
    for name, tensor in linear.backbone.state_dict().items():
        assert torch.equal(state[name], tensor)


def test_failed_export_leaves_no_partial_file(tmp_path, monkeypatch):
    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=False, in_channels=3)
    out = tmp_path / "encoder.pt"
    out.write_bytes(b"previous export")

    def crash_midway(obj, f):
        f.write(b"half a state dict")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        export_backbone(tmp_path / "simclr.ckpt", out)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt", "simclr.ckpt"]


def test_command_line_entry(tmp_path, capsys):
    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=True, in_channels=1)
    main([str(tmp_path / "simclr.ckpt"), str(tmp_path / "encoder.pt")])
    printed = capsys.readouterr().out
    assert "torchvision.models.resnet18()" in printed and "cifar_stem=True" in printed
    assert (tmp_path / "encoder.pt").is_file()


def test_not_a_resnet_checkpoint_is_refused(tmp_path):
    torch.save({"state_dict": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="holds no encoder"):
        export_backbone(tmp_path / "x.ckpt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_export_with_the_first_head_layer_loads_strictly_into_torchvision(tmp_path, capsys):
    model = save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=False, in_channels=3)
    main([str(tmp_path / "simclr.ckpt"), str(tmp_path / "v2.pt"), "--head-layers", "1"])
    assert "net.fc = nn.Sequential(nn.Linear(512, 32, bias=False)" in capsys.readouterr().out
    net = torchvision.models.resnet18()
    # SimCLR v2's first head layer, written out here: Linear(no bias) -> BN -> ReLU
    net.fc = nn.Sequential(nn.Linear(512, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU())
    net.load_state_dict(torch.load(tmp_path / "v2.pt", weights_only=True))  # strict
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        want = model.head.net[2](model.head.net[1](model.head.net[0](model.backbone(x))))
        torch.testing.assert_close(net.eval()(x), want)


def test_export_of_more_head_layers_than_there_are_is_refused(tmp_path):
    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=True, in_channels=1)
    with pytest.raises(ValueError, match="head_layers=5 is invalid: must be <= 3"):
        export_backbone(tmp_path / "simclr.ckpt", tmp_path / "x.pt", head_layers=5)
    assert not (tmp_path / "x.pt").exists()


def encoder_in_file(path: Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a Lightning checkpoint, read with torch alone."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def test_a_timm_encoder_with_its_own_head_loads_and_exports(tmp_path, capsys):
    """timm's ConvNeXt keeps ``head.norm`` with num_classes=0: in a SimCLR checkpoint that is
    ``backbone.head.norm.*``, part of the encoder, not the projection head (``head.net.*``)."""
    timm = pytest.importorskip("timm")
    assert "convnext_atto" in timm.list_models("convnext_atto")
    ckpt = tmp_path / "simclr.ckpt"
    model = save_simclr_checkpoint(ckpt, False, 3, size=32, backbone="timm:convnext_atto")
    saved = encoder_in_file(ckpt)
    assert {"head.norm.weight", "head.norm.bias"} <= saved.keys()

    linear = LinearEval(str(ckpt), num_classes=3)
    loaded = linear.backbone.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    main([str(ckpt), str(tmp_path / "encoder.pt")])
    assert (
        "timm.create_model('convnext_atto', num_classes=0, in_chans=3)" in capsys.readouterr().out
    )
    net = timm.create_model("convnext_atto", num_classes=0)
    net.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True))  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.backbone.eval()(x), rtol=0, atol=0)

    # the exported file, a plain state dict holding head.norm.*, is an encoder too
    again = LinearEval(
        str(tmp_path / "encoder.pt"), num_classes=3, backbone="timm:convnext_atto", cifar_stem=False
    )
    assert all(torch.equal(again.backbone.state_dict()[k], saved[k]) for k in saved)


def test_the_printed_timm_rebuild_keeps_timm_kwargs_and_loads_strictly(tmp_path, capsys):
    """A ViT's position embedding is sized by ``img_size``: without the run's timm_kwargs the
    printed model cannot take the file."""
    timm = pytest.importorskip("timm")
    model = SimCLR(backbone="timm:test_vit", cifar_stem=False, timm_kwargs={"img_size": 32})
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save(ckpt, tmp_path / "vit.ckpt")
    main([str(tmp_path / "vit.ckpt"), str(tmp_path / "vit.pt")])
    printed = capsys.readouterr().out
    code = textwrap.dedent(printed.split("load it with:\n", 1)[1])
    assert "img_size=32" in code
    scope = {"timm": timm, "torch": torch}
    exec(code, scope)  # the printed lines, as a user pastes them
    net = scope["net"]
    net.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True))  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.backbone.eval()(x))


@pytest.mark.parametrize(("k", "output_bn"), [(1, True), (2, True), (3, True), (3, False)])
def test_linear_eval_on_an_export_with_head_layers(tmp_path, k, output_bn):
    """A file exported with --head-layers k feeds LinearEval(head_layers=k) the same features
    as the pretrained head's first k layers (the whole 3-layer head at k=3, with or without
    its output BatchNorm), and LinearEval's own checkpoint rebuilds them without the file."""
    model = save_simclr_checkpoint(
        tmp_path / "simclr.ckpt", cifar_stem=False, in_channels=3, head_output_bn=output_bn
    )
    export_backbone(tmp_path / "simclr.ckpt", tmp_path / "v2.pt", head_layers=k)
    linear = LinearEval(str(tmp_path / "v2.pt"), num_classes=3, head_layers=k, cifar_stem=False)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        want = model.backbone(x)
        for layer in list(model.head.net)[: 3 * k]:  # Linear, BN, ReLU per hidden layer
            want = layer(want)
        torch.testing.assert_close(linear.eval().projection(linear.backbone(x)), want)
    rebuilt = LinearEval(**{**linear.hparams, "checkpoint": None})
    rebuilt.load_state_dict(linear.state_dict())  # strict: the same layers


def test_linear_eval_asks_for_the_head_layers_an_export_holds(tmp_path):
    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=False, in_channels=3)
    export_backbone(tmp_path / "simclr.ckpt", tmp_path / "v2.pt", head_layers=2)
    with pytest.raises(ValueError, match=r"head_layers=1 is invalid: must be 2, the layers"):
        LinearEval(str(tmp_path / "v2.pt"), num_classes=3, head_layers=1, cifar_stem=False)


def test_head_layers_from_a_torchvision_state_dict_are_refused_by_name(tmp_path):
    """A torchvision ResNet's own state dict has fc.weight and fc.bias: a classifier, no head
    layers to keep."""
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pt")
    LinearEval(str(tmp_path / "tv.pt"), num_classes=3, cifar_stem=False)  # the encoder loads
    with pytest.raises(
        ValueError, match=r"head_layers=1 is invalid: must be 0 for .*no projection"
    ):
        LinearEval(str(tmp_path / "tv.pt"), num_classes=3, head_layers=1, cifar_stem=False)


def test_linear_eval_and_export_read_the_checkpoint_file_once(tmp_path, monkeypatch):
    """Encoder, head layers and the pretraining record come from one read of the file: a
    ResNet-50 checkpoint with its optimizer state is hundreds of MB, read by every rank."""
    import simclr_lightning.checkpoint as checkpoints

    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=False, in_channels=3)
    reads = []
    original = checkpoints.read_checkpoint

    def counted(path, *args, **kwargs):
        reads.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "read_checkpoint", counted)
    model = LinearEval(str(tmp_path / "simclr.ckpt"), num_classes=3, head_layers=1)
    assert reads == [str(tmp_path / "simclr.ckpt")]
    assert model.pretraining["checkpoint"] == str(tmp_path / "simclr.ckpt")
    reads.clear()
    export_backbone(tmp_path / "simclr.ckpt", tmp_path / "v2.pt", head_layers=1)
    assert reads == [str(tmp_path / "simclr.ckpt")]


def test_a_state_dict_under_model_is_an_encoder(tmp_path):
    """``{"model": net.state_dict(), "optimizer": ..., "epoch": n}``, how plain PyTorch
    training scripts save: the export crashed on ``.detach`` of the inner dict."""
    net = torchvision.models.resnet18()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    run = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    torch.save(run, tmp_path / "run.pth")
    linear = LinearEval(str(tmp_path / "run.pth"), num_classes=3, cifar_stem=False)
    export_backbone(tmp_path / "run.pth", tmp_path / "encoder.pt")
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert state.keys() == {k for k in net.state_dict() if not k.startswith("fc.")}
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(linear.backbone.eval()(x), net.eval()(x), rtol=0, atol=0)


def test_a_dict_of_other_things_is_refused_by_what_it_holds(tmp_path):
    torch.save({"weights": nn.Linear(2, 2).state_dict(), "step": 3}, tmp_path / "run.pt")
    held = r"holds a dict with keys 'weights', 'step', not a state dict of tensors"
    with pytest.raises(CheckpointError, match=rf"^model\.checkpoint='.*run\.pt' {held}"):
        LinearEval(str(tmp_path / "run.pt"), num_classes=3)
    with pytest.raises(CheckpointError, match=rf"^checkpoint='.*run\.pt' {held}"):
        export_backbone(tmp_path / "run.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_an_export_that_does_not_fit_names_the_difference_and_the_settings(tmp_path):
    """The quick start's encoder (standard stem), exported, given to LinearEval built with
    its default CIFAR stem: the error said only 'Error(s) in loading state_dict for ResNet:'
    and asked for a state dict written by simclr-lightning-export, which it was."""
    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=False, in_channels=3)
    export_backbone(tmp_path / "simclr.ckpt", tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError) as failure:
        LinearEval(str(tmp_path / "encoder.pt"), num_classes=3)
    message = str(failure.value)
    assert "\n" not in message
    assert "conv1.weight is [64, 3, 7, 7] in the file, [64, 3, 3, 3] in the encoder" in message
    for setting in ("--model.backbone", "--model.cifar_stem", "--model.timm_kwargs"):
        assert setting in message
    assert "--model.backbone=resnet18 --model.cifar_stem=false" in message  # its shapes'
    LinearEval(str(tmp_path / "encoder.pt"), num_classes=3, cifar_stem=False)  # which fit
