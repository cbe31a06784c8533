"""simclr-lightning-export as a user meets it: one-line errors from a real process, printed
loading code that gives a timm encoder's head features, or a re-exported file's network, the
pretraining preprocessing printed and saved beside the file, and file:// checkpoint paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import simclr_lightning
from simclr_lightning import SampleDataModule, SimCLR, apply_stem
from simclr_lightning.backbones import build_backbone
from simclr_lightning.checkpoint_io import AtomicCheckpointIO
from simclr_lightning.data.sample import sample_root
from simclr_lightning.errors import CheckpointError
from simclr_lightning.evaluation import LinearEval
from simclr_lightning.export_cli import main, preprocessing_code
from simclr_lightning.heads import ScaleBatchNorm1d
from tests.helpers import quiet_trainer
from tests.test_checkpoint import save_simclr_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(simclr_lightning.__file__).resolve().parent.parent
# [project.scripts] in pyproject.toml (tomllib is Python 3.11+)
ENTRY_POINT = re.search(
    r'^simclr-lightning-export = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M
).group(1)


def export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script's entry point (``[project.scripts]`` in pyproject.toml), in a
    process."""
    module, _, function = ENTRY_POINT.partition(":")
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert " error: " in lines[0]
    return lines[0]


def test_user_errors_are_one_line_with_a_nonzero_exit(tmp_path):
    missing = one_error_line(export(str(tmp_path / "nope.ckpt"), "out.pt", cwd=tmp_path))
    assert "nope.ckpt" in missing and "does not exist" in missing

    ckpt = tmp_path / "simclr.ckpt"
    save_simclr_checkpoint(ckpt, cifar_stem=True, in_channels=1)
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    cut = one_error_line(export(str(tmp_path / "cut.ckpt"), "out.pt", cwd=tmp_path))
    assert "cut.ckpt" in cut and "truncated or corrupt" in cut

    deep = export(str(ckpt), "out.pt", "--head-layers", "5", cwd=tmp_path)
    line = one_error_line(deep)
    assert "--head-layers=5 is invalid: must be <= 3" in line
    assert "model.head_layers" not in line
    negative = one_error_line(export(str(ckpt), "out.pt", "--head-layers", "-1", cwd=tmp_path))
    assert "--head-layers=-1 is invalid" in negative
    assert not (tmp_path / "out.pt").exists()


def test_files_that_are_no_checkpoint_are_one_line_errors(tmp_path):
    """Text, a pickled module and a dict of other things: each named for what it is, not a
    KeyError, UnpicklingError or AttributeError traceback."""
    (tmp_path / "hello.ckpt").write_text("hello\n")
    garbage = one_error_line(export("hello.ckpt", "out.pt", cwd=tmp_path))
    assert "checkpoint='hello.ckpt' is truncated or corrupt" in garbage

    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    module = one_error_line(export("module.pt", "out.pt", cwd=tmp_path))
    assert "module.pt' holds objects the weights-only loader refuses" in module
    assert "torch.nn.modules.linear.Linear" in module and "truncated" not in module

    torch.save({"weights": nn.Linear(2, 2).state_dict(), "step": 3}, tmp_path / "run.pt")
    other = one_error_line(export("run.pt", "out.pt", cwd=tmp_path))
    assert "run.pt' holds a dict with keys 'weights', 'step', not a state dict of tensors" in other
    assert not (tmp_path / "out.pt").exists()


def test_the_console_script_is_the_export_command():
    assert ENTRY_POINT == "simclr_lightning.export_cli:main"
    module, _, function = ENTRY_POINT.partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is main


def test_export_prints_and_saves_the_pretraining_preprocessing(tmp_path, capsys):
    """A CIFAR encoder fed torchvision's usual ImageNet statistics gives other features: the
    printed code prepares images as pretraining did, the JSON beside the file records it, and
    the file itself stays a plain state dict."""
    model = SimCLR(head_hidden_dim=16, head_output_dim=8, warmup_epochs=0)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=SampleDataModule(batch_size=8, num_workers=0))
    trainer.save_checkpoint(tmp_path / "pretrain.ckpt")
    out = tmp_path / "encoder.pt"
    main([str(tmp_path / "pretrain.ckpt"), str(out)])
    code = textwrap.dedent(capsys.readouterr().out.split("load it with:\n", 1)[1])
    scope = {"torch": torch, "torchvision": torchvision, "apply_stem": apply_stem}
    exec(code, scope)  # the printed lines, as a user pastes them

    saved = json.loads(Path(f"{out}.preprocessing.json").read_text())
    cifar_mean, cifar_std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    assert saved["image_size"] == 32
    np.testing.assert_allclose(saved["mean"], cifar_mean, atol=1e-4)
    np.testing.assert_allclose(saved["std"], cifar_std, atol=1e-4)
    state = torch.load(out, weights_only=True)
    assert state.keys() == model.backbone.state_dict().keys()  # nothing added to the file

    image = Image.open(sorted((sample_root() / "val" / "cat").iterdir())[0]).convert("RGB")
    rgb = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
    want = (rgb - torch.tensor(cifar_mean).view(3, 1, 1)) / torch.tensor(cifar_std).view(3, 1, 1)
    torch.testing.assert_close(scope["preprocess"](image), want, atol=1e-3, rtol=0)

    # a file that records none (the export itself) leaves no stale record at its output
    again = tmp_path / "again.pt"
    main([str(tmp_path / "pretrain.ckpt"), str(again)])
    assert Path(f"{again}.preprocessing.json").exists()
    capsys.readouterr()
    main([str(out), str(again)])
    assert "records no preprocessing" in capsys.readouterr().out
    assert not Path(f"{again}.preprocessing.json").exists()


@pytest.mark.parametrize("channels", [3, 1])
def test_the_printed_preprocessing_reads_images_of_any_mode(channels):
    """``preprocess(Image.open(p))`` on an RGBA, palette, CMYK or grayscale file failed with a
    tensor size mismatch in Normalize: the library's reader converts every image to RGB (L
    for a one-channel encoder), and so does the printed code now."""
    mode = "RGB" if channels == 3 else "L"
    record = {"image_size": 8, "mean": [0.5] * channels, "std": [0.25] * channels}
    scope = {"torchvision": torchvision}
    exec(textwrap.dedent(preprocessing_code(record, "enc.pt.preprocessing.json")), scope)
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 4), dtype=np.uint8)
    rgba = Image.fromarray(pixels, "RGBA")
    images = [rgba, rgba.convert("P"), rgba.convert("CMYK"), rgba.convert("L"), rgba.convert("RGB")]
    for image in images:
        got = scope["preprocess"](image)
        assert got.shape == (channels, 8, 8), image.mode
        # by hand: PIL's conversion and bilinear resize, then (x / 255 - mean) / std
        pixels = np.asarray(image.convert(mode).resize((8, 8), Image.BILINEAR), np.float64)
        want = torch.from_numpy((pixels / 255 - 0.5) / 0.25).reshape(8, 8, channels)
        torch.testing.assert_close(got.double(), want.permute(2, 0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "cifar_stem", "in_channels"), [("resnet50", True, 3), ("resnet34", False, 1)]
)
def test_reexport_prints_the_network_the_files_shapes_are(
    tmp_path, capsys, name, cifar_stem, in_channels
):
    """An exported file records no architecture: its re-export printed a standard-stem
    resnet18 for any of them, into which it does not load."""
    encoder, _ = build_backbone(name, cifar_stem, in_channels)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")  # what an export holds
    main([str(tmp_path / "encoder.pt"), str(tmp_path / "again.pt")])
    code = textwrap.dedent(capsys.readouterr().out.split("load it with:\n", 1)[1])
    scope = {"torch": torch, "torchvision": torchvision, "apply_stem": apply_stem}
    exec(code, scope)  # the printed lines, as a user pastes them
    net = scope["net"]
    net.fc = nn.Identity()
    x = torch.randn(2, in_channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), encoder.eval()(x), rtol=0, atol=0)


def test_reexport_of_a_network_it_cannot_tell_says_so(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    vit = timm.create_model("test_vit", num_classes=0, img_size=32)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    main([str(tmp_path / "vit.pt"), str(tmp_path / "again.pt")])
    printed = capsys.readouterr().out
    assert "records no architecture" in printed and "torchvision.models" not in printed
    assert "--model.backbone" in printed and "--model.timm_kwargs" in printed
    vit.load_state_dict(torch.load(tmp_path / "again.pt", weights_only=True))  # strict


@pytest.mark.parametrize("k", [1, 2, 3])
def test_printed_code_gives_a_timm_encoder_and_its_head_layers(tmp_path, capsys, k):
    """ConvNeXt's classifier is ``head.fc`` and its forward never calls ``net.fc``: the
    printed code must still run the exported head layers after the encoder."""
    timm = pytest.importorskip("timm")
    ckpt = tmp_path / "simclr.ckpt"
    model = save_simclr_checkpoint(ckpt, False, 3, size=32, backbone="timm:test_convnext")
    assert not hasattr(timm.create_model("test_convnext", num_classes=0), "fc")
    out = tmp_path / "v2.pt"
    main([str(ckpt), str(out), "--head-layers", str(k)])
    code = textwrap.dedent(capsys.readouterr().out.split("load it with:\n", 1)[1])
    scope = {"timm": timm, "torch": torch, "nn": nn, "ScaleBatchNorm1d": ScaleBatchNorm1d}
    exec(code, scope)  # the printed lines, as a user pastes them
    net = scope["net"].eval()

    # by hand: hidden layers are Linear, BN, ReLU; the last (k=3) Linear, scale-only BN
    modules = list(model.head.net)[: {1: 3, 2: 6, 3: 8}[k]]
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        want = model.backbone(x)
        for module in modules:
            want = module(want)
        got = net(x)
    assert got.shape == want.shape == (2, 8 if k == 3 else 32)
    torch.testing.assert_close(got, want)


def test_a_file_url_checkpoint_saves_and_loads_at_its_local_path(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    target = tmp_path / "ckpts" / "x.ckpt"
    url = f"file://{target}"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weight": torch.arange(3.0)}, url)
    assert target.is_file()
    assert list(work.iterdir()) == []  # no ./file:/... folder
    torch.testing.assert_close(io.load_checkpoint(url)["weight"], torch.arange(3.0))
    torch.testing.assert_close(io.load_checkpoint(str(target))["weight"], torch.arange(3.0))


def test_output_that_is_the_checkpoint_itself_is_refused_before_writing(tmp_path, capsys):
    """Same path, another spelling, a symlink either way, a symlinked folder: the Lightning
    checkpoint must keep its bytes (a plain state dict over it ends the run's resumability)."""
    run = tmp_path / "out"
    run.mkdir()
    ckpt = run / "last.ckpt"
    save_simclr_checkpoint(ckpt, cifar_stem=True, in_channels=1)
    data = ckpt.read_bytes()
    (tmp_path / "link.ckpt").symlink_to(ckpt)  # a symlink to the checkpoint
    real = run / "epoch=0.ckpt"  # and a checkpoint its symlinked last.ckpt names
    real.write_bytes(data)
    (run / "last_link.ckpt").symlink_to(real.name)
    (tmp_path / "run_link").symlink_to(run, target_is_directory=True)

    same = export("out/last.ckpt", "out/last.ckpt", cwd=tmp_path)
    line = one_error_line(same)
    assert "simclr-lightning-export: error: output out/last.ckpt is the checkpoint" in line
    assert "give another output path" in line and same.returncode == 2
    pairs = [
        (str(ckpt), f"{tmp_path}/out/../out/./last.ckpt"),
        (str(ckpt), str(tmp_path / "link.ckpt")),
        (str(tmp_path / "link.ckpt"), str(ckpt)),
        (str(run / "last_link.ckpt"), str(real)),
        (str(ckpt), str(tmp_path / "run_link" / "last.ckpt")),
        (f"file://{ckpt}", str(ckpt)),
    ]
    for source, output in pairs:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main([source, output])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "is the checkpoint" in err, (source, output, err)
    for path in (ckpt, real):
        assert path.read_bytes() == data
        assert not Path(f"{path}.preprocessing.json").exists()
    assert (tmp_path / "link.ckpt").is_symlink() and (run / "last_link.ckpt").is_symlink()


class OwnEncoder(SimCLR):
    """A user's SimCLR whose encoder replaces the ResNet its settings still name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backbone = nn.Sequential(nn.Conv2d(3, 512, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_an_encoder_other_than_the_recorded_network_is_refused(tmp_path):
    """The export printed ``net = torchvision.models.resnet18()`` and a ``strict=False`` load
    for a replaced encoder, exit 0: that code loaded nothing and left an untrained ResNet.
    LinearEval called the same SimCLR checkpoint no SimCLR checkpoint."""
    save_simclr_checkpoint(tmp_path / "own.ckpt", cifar_stem=False, in_channels=3, cls=OwnEncoder)
    line = one_error_line(export("own.ckpt", "out.pt", cwd=tmp_path))
    assert "checkpoint='own.ckpt' holds an encoder that is not the resnet18 its hyperparam" in line
    assert "keys unexpected, e.g. '0.weight'" in line
    assert "torch.save(model.backbone.state_dict(), path)" in line
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(CheckpointError, match=(
        r"its encoder is not the resnet18 its hyperparameters record \(a SimCLR subclass with "
        r"its own backbone\?\): LinearEval builds --model.backbone encoders only"
    )):  # fmt: skip
        LinearEval(checkpoint=str(tmp_path / "own.ckpt"), num_classes=3)
