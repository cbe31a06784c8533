"""The GPU session's dry run: every part of ``benchmarks/gpu_session.py`` runs its code path at
tiny sizes on the CPU and leaves figures a session could report. The speeds mean nothing here
(issue 11 measures them on a lent GPU); what is checked is that each part wrote its figures,
that each figure is of its kind (a rate above zero, a ratio the quotient of its rows, a kNN
top-1 a percentage) and that each timed window counted exactly the steps it was asked for.
Then the runner itself, on real processes: parts of one step run at the same time, each under
its own guard, and a part's guard kills everything its program started."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_session  # noqa: E402

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
    parts = json.loads((out / "session.json").read_text())
    assert set(parts) == {*RUN_PARTS, "tests"}
    for name in RUN_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name])
        assert f"\n{name:<11} ok" in summary, name
    logs = {"env", "throughput", "e2e", "tta-budget", "tta-epochs-gpu", "tta-epochs-cpu"}
    for name in logs:
        assert (out / f"{name}.log").stat().st_size > 0, name
    # what a device call brings back: at most 8 files, none deeper than the folder
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [f"{n}.log" for n in logs] + ["session.json"]
    )
    assert parts["tests"]["status"] == "skipped"  # --tiny runs no pytest
    # the call's default order: the timed parts alone, the tests beside the pair
    began = sorted(parts, key=lambda p: parts[p]["began_s"])
    assert began[:4] == ["env", "e2e", "tta-budget", "throughput"]

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
    assert set(rates) == {"hand-step", "model-alone", "e2e", "e2e-bar1", "e2e-sgd", "cpu-pipeline"}
    for row in e2e["rows"]:
        if row["key"] in rates:
            assert row["ratio"] == pytest.approx(rates[row["key"]] / rates["model-alone"])

    throughput = parts["throughput"]
    by_name = {row["name"]: row for row in throughput["rows"]}
    assert any("nvJPEG" in name for name in by_name)
    # the CIFAR pipelines are e2e's rows: throughput keeps only the augmentation alone there
    assert "CIFAR: GPUAugment alone (two views)" in by_name
    assert not [n for n in by_name if n.startswith("CIFAR R18")]
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


# -- the runner, on real processes --------------------------------------------------------------
# prints, optionally starts a grandchild that sleeps a minute (its pid to a file), then sleeps
SLEEPER = """
import subprocess, sys, time
pid_file, seconds = sys.argv[1], float(sys.argv[2])
if pid_file != "-":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(pid_file, "w").write(str(child.pid))
print("started", flush=True)
time.sleep(seconds)
"""


def sleeping_part(seconds: float, pid_file="-"):
    def body(s, log):
        cmd = [sys.executable, "-c", SLEEPER, str(pid_file), str(seconds)]
        return s.process(log, cmd, s.guard(log.stem))

    return body


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_parts_of_a_step_run_together_each_under_its_own_guard(tmp_path, monkeypatch):
    grandchild = tmp_path / "grandchild.pid"
    monkeypatch.setitem(gpu_session.PART_BODIES, "tests", sleeping_part(60, grandchild))
    monkeypatch.setitem(gpu_session.PART_BODIES, "tta-epochs", sleeping_part(3))
    monkeypatch.setitem(gpu_session.GUARDS, "tests", 5)  # the 60 s sleeper outruns it
    monkeypatch.setitem(gpu_session.GUARDS, "tta-epochs", 60)
    a = gpu_session.parse_args(["--part", "tests+tta-epochs", "--out", str(tmp_path / "out")])
    assert a.steps == [["tests", "tta-epochs"]]
    a.out.mkdir()
    session = gpu_session.Session(a)
    session.run_step(a.steps[0])

    results = json.loads((a.out / "session.json").read_text())
    tests, pair = results["tests"], results["tta-epochs"]
    assert tests["status"] == "timeout" and pair["status"] == "ok", results
    # the two ran at the same time: each began before the other ended
    assert pair["began_s"] < tests["began_s"] + tests["seconds"]
    assert tests["began_s"] < pair["began_s"] + pair["seconds"]
    # each under its own guard: the pair's 3 s ran out, the tests were stopped at their 5 s
    assert 3 <= pair["seconds"] < 60 and 5 <= tests["seconds"] < 60
    assert "killed after its guard of 5 s" in (a.out / "tests.log").read_text()
    assert "started" in (a.out / "tta-epochs.log").read_text()
    # the guard killed what the part's program had started too, not only the program
    pid = int(grandchild.read_text())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, 9)
        pytest.fail(f"the guard left the part's grandchild {pid} running")


def test_next_call_names_the_parts_left_and_the_parts_failed():
    a = gpu_session.parse_args(["--part", "env,e2e,tests+tta-epochs,throughput"])
    results = {
        "env": {"status": "ok"},
        "e2e": {"status": "failed"},
        "tests": {"status": "ok"},
        "tta-epochs": {"status": "timeout"},
    }  # throughput never began: the call was killed
    text = "\n".join(gpu_session.next_call(results, a))
    assert "failed: e2e: fix on the CPU first (e2e.log)" in text
    deadline = gpu_session.GUARDS["tta-epochs"] + gpu_session.GUARDS["throughput"] + 15
    assert f"--part tta-epochs,throughput --deadline {deadline}" in text
    assert f"only with {deadline + 30} s of device time left" in text

    done = {part: {"status": "ok"} for part in a.parts}
    text = "\n".join(gpu_session.next_call(done, a))
    assert "failed" not in text and gpu_session.EXTRAS in text


def e2e_results(**rates: float) -> dict:
    rows = [{"key": key.replace("_", "-"), "images_per_s": rate} for key, rate in rates.items()]
    return {"e2e": {"status": "ok", "rows": rows}}


def test_the_schedules_follow_the_speeds_this_call_measured():
    a = gpu_session.parse_args(["--out", "unused"])
    session = gpu_session.Session(a)
    # the budget run: 3 minutes less 10 s of start at the SGD row's speed, whole epochs of
    # 97 batches of 512 (CIFAR-10's 50,000 images, last partial batch dropped)
    session.results = e2e_results(e2e=21_000.0, e2e_sgd=20_000.0, cpu_pipeline=7_000.0)
    assert gpu_session.budget_epochs(session)[0] == (3 * 60 - 10) * 20_000 // (97 * 512) == 68
    session.results = e2e_results(e2e=21_000.0)  # no SGD row: the LARS row
    assert gpu_session.budget_epochs(session)[0] == 170 * 21_000 // (97 * 512)
    # the pair: 10 epochs, fewer where the CPU pipeline at 70% of its speed cannot train them
    session.results = e2e_results(cpu_pipeline=7_000.0)  # 150 s x 4,900 / 49,664 = 14.8
    assert gpu_session.pair_epochs(session, 150)[0] == 10
    session.results = e2e_results(cpu_pipeline=3_000.0)  # 150 s x 2,100 / 49,664 = 6.3
    assert gpu_session.pair_epochs(session, 150)[0] == 6
    session.results = e2e_results(cpu_pipeline=500.0)  # never under 4
    assert gpu_session.pair_epochs(session, 150)[0] == 4
    session.results = {}
    assert gpu_session.pair_epochs(session, 150)[0] == 10
    shutil.rmtree(session.tmp, ignore_errors=True)
