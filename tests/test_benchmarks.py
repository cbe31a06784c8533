"""The benchmark scripts' code paths run on CPU with tiny sizes. Their speeds mean nothing here
(they are measured on a GPU), but what they print must be well formed: every figure positive
and finite, and every ratio the quotient of the rows it names."""

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

ROWS = (
    "CIFAR R18: model alone",
    "CIFAR R18: CPU pipeline",
    "CIFAR R18: GPU pipeline, resident",
    "GPUAugment alone",
    "ImageNet R50 64px: model alone",
    "ImageNet R50 64px: CPU pipeline",
    "nvJPEG decode",
)


def parse_throughput(out: str) -> tuple[dict[str, tuple[float, str]], dict[str, float]]:
    """``{row: (images/s, peak GiB field)}`` of the table and ``{row: ratio}`` of the ratios."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("pipeline"))
    table = {}
    for line in lines[head + 1 :]:
        if not line.strip():
            break
        name, rate, peak = re.fullmatch(r"(.+?)\s+(\S+)\s+(\S+)", line).groups()
        table[name] = (float(rate), peak)
    ratios = {}
    for line in lines:
        match = re.fullmatch(r"(.+?)\s+(\S+) x model alone", line)
        if match:
            ratios[match.group(1)] = float(match.group(2))
    return table, ratios


def model_alone_row(table: dict, pipeline: str) -> str:
    """The model-alone row of the same workload (text before ':') and variant ('(eager)')."""
    workload = pipeline.split(":")[0]
    variant = pipeline[pipeline.rfind("(") :] if pipeline.endswith(")") else ""
    (row,) = [
        name
        for name in table
        if name.startswith(workload + ":") and "model alone" in name and name.endswith(variant)
    ]
    return row


def load_script(name: str):
    """A benchmark script as a module: its ``main(argv)`` runs here, without the seconds a
    fresh process spends importing torch and Lightning."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_throughput_tiny_prints_consistent_figures(capsys, monkeypatch):
    # main() turns cuDNN autotuning on for the process: back as it was after this test
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    load_script("throughput").main(["--tiny"])
    out = capsys.readouterr().out
    assert out.startswith("device: CPU")
    table, ratios = parse_throughput(out)
    for row in ROWS:
        assert any(row in name for name in table), row
    for name, (rate, peak) in table.items():
        assert math.isfinite(rate) and rate > 0, name
        assert peak == "-", name  # no GPU memory to report on a CPU
    pipelines = [name for name in table if "pipeline" in name]
    assert pipelines and sorted(ratios) == sorted(pipelines)
    for name, ratio in ratios.items():
        alone = table[model_alone_row(table, name)][0]
        rate = table[name][0]
        # rates are printed to 1 decimal (+-0.05), the ratio to 2 (+-0.005)
        low, high = (rate - 0.05) / (alone + 0.05), (rate + 0.05) / (alone - 0.05)
        assert low - 0.005 <= ratio <= high + 0.005, (name, ratio, rate, alone)
    assert "crop+resize max |diff|" in out
    diff = float(re.search(r"crop\+resize max \|diff\| vs TF.resized_crop: (\S+)", out).group(1))
    assert diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["cpu", "gpu"])
def test_time_to_accuracy_tiny_runs_both_pipelines(cifar_tiny, augment, capsys):
    main = load_script("time_to_accuracy").main
    main(["--root", str(cifar_tiny), "--tiny", "--augment", augment])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"device (.+) \| augment (\w+) \| epochs (\S+) of (\d+) \| setup (\d+) s "
        r"\| train (\d+) s \| (\d+) steps \| kNN top-1 (\S+)%",
        line,
    )
    assert match, line
    device, run_augment, epochs, _, setup_s, train_s, steps, top1 = match.groups()
    assert device == "CPU" and run_augment == augment
    assert float(epochs) == 1 and int(steps) == 3  # --tiny: one epoch of 3 batches
    assert 0 <= int(setup_s) < 600 and 0 <= int(train_s) < 600
    assert 0 <= float(top1) <= 100 and math.isfinite(float(top1))


def tiny_tta_argv(out) -> list[str]:
    from simclr_lightning import sample_root

    return ["--root", str(sample_root()), "--tiny", "--augment", "cpu", "--json", str(out)]


@pytest.mark.slow
def test_time_to_accuracy_stopped_mid_epoch_counts_the_fraction_trained(tmp_path):
    """Lightning's current_epoch counts an epoch a time limit cut part way as done, so a cut
    run passed as equal to a whole one in the equal-epochs pair."""
    out = tmp_path / "tta.json"
    # a deadline already past: one step of the epoch's 3 (--tiny), then stop
    load_script("time_to_accuracy").main([*tiny_tta_argv(out), "--stop-by", "0"])
    figures = json.loads(out.read_text())
    assert figures["steps"] == 1 and figures["steps_per_epoch"] == 3
    assert figures["epochs_done"] == pytest.approx(1 / 3)
    assert figures["stopped_by_deadline"] and figures["stage"] == "done"
    assert 0 <= figures["knn_top1"] <= 100


@pytest.mark.slow
def test_time_to_accuracy_writes_its_training_figures_before_the_knn(tmp_path, monkeypatch):
    """A run its guard kills during the kNN (60,000 images at full size) still leaves the
    epochs it trained, written whole."""
    tta = load_script("time_to_accuracy")
    out = tmp_path / "tta.json"

    def killed(*args):
        raise KeyboardInterrupt  # the part's guard, during the kNN

    monkeypatch.setattr(tta, "knn_top1", killed, raising=False)
    with pytest.raises(KeyboardInterrupt):
        tta.main(tiny_tta_argv(out))
    figures = json.loads(out.read_text())
    assert figures["stage"] == "trained" and "knn_top1" not in figures
    assert figures["steps"] == 3 and figures["epochs_done"] == 1
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, then renamed


def test_e2e_figures_survive_a_kill_during_their_rewrite(tmp_path, monkeypatch):
    """e2e_throughput.py rewrites its figures after every row; the session's guard may kill
    it during a rewrite, which must leave the last whole file, not half of a new one."""
    import argparse
    import pathlib

    e2e = load_script("e2e_throughput")
    out = tmp_path / "e2e.json"
    a = argparse.Namespace(json=str(out), cuda=False, batch_size=512, warmup=30, steps=200)
    first = [e2e.Row("hand-step", "hand-written step", images_per_s=20_000.0)]
    e2e.write_json(a, first)
    write_text = pathlib.Path.write_text

    def killed_half_way(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the guard's SIGKILL, as far as the file can tell

    monkeypatch.setattr(pathlib.Path, "write_text", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        e2e.write_json(a, [*first, e2e.Row("e2e", "e2e: GPU pipeline", images_per_s=1.0)])
    monkeypatch.undo()
    rows = json.loads(out.read_text())["rows"]
    assert [r["key"] for r in rows] == ["hand-step"]


def run_loss_memory(*args: str) -> str:
    script = REPO / "benchmarks" / "loss_memory.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


CELL = re.compile(r"(\S+) GiB, (\S+) s")


@pytest.mark.slow
def test_loss_memory_tiny_prints_consistent_figures():
    out = run_loss_memory()
    lines = out.splitlines()
    assert lines[0].startswith("device: CPU (1 thread(s)), torch ")
    columns = [c.strip() for c in lines[1].split("|")][1:]
    assert columns == ["tiled + stats", "tiled", "untiled", "untiled + stats", "lightly"]
    table = {}
    for line in lines[2:4]:
        n, *cells = (c.strip() for c in line.split("|"))
        for name, cell in zip(columns, cells, strict=True):
            match = CELL.fullmatch(cell)
            if name == "lightly" and not match:
                assert cell == "not installed"
                continue
            peak, seconds = float(match.group(1)), float(match.group(2))
            assert peak > 0 and seconds > 0, (n, name)
            table[int(n.replace(",", "")), name] = peak
    assert sorted({n for n, _ in table}) == [256, 1024]
    # each ratio is the quotient of the cells it names (4 significant digits, ratio to 3)
    ratios = 0
    for line in lines:
        if line.startswith("N="):
            n = int(line[2:].split(":")[0].replace(",", ""))
            for name, mem in re.findall(r"tiled \+ stats / ([\w +]+?): memory (\S+?)x", line):
                want = table[n, "tiled + stats"] / table[n, name]
                assert float(mem) == pytest.approx(want, rel=2e-3, abs=1e-3), (n, name)
                ratios += 1
    assert ratios >= 6
    # the GPU estimates scale the largest tiled row linearly
    estimate = re.search(r"\n\s+65,536 \|\s+(\S+) GiB", out)
    assert estimate, out
    want = table[1024, "tiled + stats"] * 65536 / 1024
    assert float(estimate.group(1)) == pytest.approx(want, rel=0.01, abs=0.01)


@pytest.mark.slow
def test_grad_cache_step_table_tiny():
    out = run_loss_memory("--grad-cache")
    assert out.startswith("device: CPU")
    rows = re.findall(r"^\s+(\d+) \|\s+(\S+) GiB \|\s+(\S+) s \| memory (\S+)x", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2]
    first = float(rows[0][1])
    for _, peak, seconds, ratio in rows:
        assert float(peak) > 0 and float(seconds) > 0
        assert float(ratio) == pytest.approx(float(peak) / first, rel=2e-3, abs=1e-3)
