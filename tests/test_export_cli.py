"""simclr-lightning-export as a user meets it: one-line errors from a real process, printed
loading code that gives a timm encoder's head features, and file:// checkpoint paths."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import simclr_lightning
from simclr_lightning.checkpoint import main
from simclr_lightning.checkpoint_io import AtomicCheckpointIO
from simclr_lightning.heads import ScaleBatchNorm1d
from tests.test_checkpoint import save_simclr_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(simclr_lightning.__file__).resolve().parent.parent


def export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script's entry point (``simclr_lightning.checkpoint:main``), in a process."""
    script = "import sys; from simclr_lightning.checkpoint import main; sys.exit(main())"
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
