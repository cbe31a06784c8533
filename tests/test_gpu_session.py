"""The GPU session's dry run: every part of ``benchmarks/gpu_session.py`` runs its code path at
tiny sizes on the CPU and leaves figures a session could report. The speeds mean nothing here
(issue 11 measures them on a lent GPU); what is checked is that each part wrote its JSON, that
each figure is of its kind (a rate above zero, a ratio the quotient of its rows, a kNN top-1 a
percentage) and that each timed window counted exactly the steps it was asked for."""

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO

RUN_PARTS = ("env", "throughput", "e2e", "tta-epochs", "tta-budget")


def test_dry_run_writes_sane_figures_for_every_part(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_session.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the summary prints last: one block per part, the targets after them
    summary = proc.stdout[proc.stdout.index("== gpu_session:") :]
    assert "targets (issue 11)" in summary
    parts = {p: json.loads((out / f"{p}.json").read_text()) for p in (*RUN_PARTS, "tests")}
    for name in RUN_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name])
        assert (out / f"{name}.log").stat().st_size > 0, name
        assert f"\n{name:<11} ok" in summary, name
    assert parts["tests"]["status"] == "skipped"  # --tiny runs no pytest

    env = parts["env"]
    assert env["import_failures"] == {}
    assert all(text.startswith("ok") for text in env["checks"].values()), env["checks"]

    e2e = parts["e2e"]
    rates = {}
    for row in e2e["rows"]:
        if row["key"].startswith("compile-"):  # compiling takes minutes on a CPU
            assert row["images_per_s"] is None and "tiny" in row["note"]
            continue
        assert row["error"] is None, row
        assert row["steps"] == e2e["steps"], row  # the window counted the steps asked for
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row
        assert row["images_per_s"] == pytest.approx(
            row["steps"] * e2e["batch_size"] / row["seconds"], rel=1e-9
        )
        rates[row["key"]] = row["images_per_s"]
    assert set(rates) == {
        "hand-step",
        "model-alone",
        "e2e",
        "e2e-bar",
        "e2e-bar1",
        "e2e-sync",
        "e2e-sgd",
        "e2e-lars-loop",
        "cpu-pipeline",
    }
    for row in e2e["rows"]:
        if row["key"] in rates:
            assert row["ratio"] == pytest.approx(rates[row["key"]] / rates["model-alone"])

    throughput = parts["throughput"]
    by_name = {row["name"]: row for row in throughput["rows"]}
    assert any("nvJPEG" in name for name in by_name)
    for name, row in by_name.items():
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, name
        if "pipeline" in name:  # its ratio is to the model-alone row of its workload
            alone = next(
                r
                for n, r in by_name.items()
                if n.split(":")[0] == name.split(":")[0] and "model alone" in n
            )
            assert row["ratio"] == pytest.approx(row["images_per_s"] / alone["images_per_s"])

    runs = [parts["tta-epochs"]["cpu"], parts["tta-epochs"]["gpu"], parts["tta-budget"]]
    assert [r["augment"] for r in runs] == ["cpu", "gpu", "gpu"]
    for run in runs:
        assert 0 <= run["knn_top1"] <= 100
        assert run["steps"] == 3 and run["epochs_done"] == 1  # --tiny: one epoch of 3 batches
        assert run["train_images_per_s"] > 0
    gap = parts["tta-epochs"]["knn_gap"]
    assert gap == pytest.approx(runs[1]["knn_top1"] - runs[0]["knn_top1"])
