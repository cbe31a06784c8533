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
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO
from tests.test_benchmarks import load_script

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
    assert set(parts) == {*RUN_PARTS, "tests", "data"}
    assert parts["data"]["status"] == "ok"  # the CIFAR copy, made before the first step
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
    assert began[:5] == ["data", "env", "e2e", "tta-budget", "throughput"]

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
        assert run["steps_per_epoch"] == 3 and run["stage"] == "done"
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
    guards, extract = gpu_session.GUARDS, gpu_session.EXTRACT_S
    deadline = guards["tta-epochs"] + guards["throughput"] + extract + 15
    assert f"--part tta-epochs,throughput --deadline {deadline}" in text
    assert f"only with {deadline + 30} s of device time left" in text

    done = {part: {"status": "ok"} for part in a.parts}
    text = "\n".join(gpu_session.next_call(done, a))
    assert "failed" not in text and gpu_session.EXTRAS in text
    assert f"{gpu_session.COMPILE_TESTS_CALL} --deadline" in text  # the compile tests' call


def test_next_call_keeps_steps_together_and_within_the_device_limit():
    a = gpu_session.parse_args([])  # the call's default steps
    text = "\n".join(gpu_session.next_call({}, a))  # killed before any part ended
    redo = re.search(r"--part (\S+) --deadline (\d+)", text)
    assert redo[1] == gpu_session.DEFAULT_STEPS  # tests+tta-epochs still one step
    # the runbook's timeout_s is the deadline + 30, and a call gets at most 570 s
    assert int(redo[2]) + 30 <= 570 and f"only with {int(redo[2]) + 30} s" in text
    # a step's parts run at the same time: its longest guard counts, not their sum
    a = gpu_session.parse_args(["--part", "tests+tta-epochs"])
    text = "\n".join(gpu_session.next_call({}, a))
    guards = gpu_session.GUARDS
    want = max(guards["tests"], guards["tta-epochs"]) + gpu_session.EXTRACT_S + 15
    assert f"--part tests+tta-epochs --deadline {want}" in text


def test_an_explicit_deadline_raises_the_guard_of_a_call_of_one_part(tmp_path):
    def guard_of(argv: list[str], part: str) -> float:
        session = gpu_session.Session(gpu_session.parse_args([*argv, "--out", str(tmp_path)]))
        session.part_start[part] = time.monotonic()
        shutil.rmtree(session.tmp, ignore_errors=True)
        return session.guard(part)

    # the extras: the compiled rows need more than e2e's usual guard, and the call gives it
    extras = gpu_session.EXTRAS.split()
    assert guard_of([*extras, "--deadline", "210"], "e2e") == pytest.approx(195, abs=1)
    assert gpu_session.GUARDS["e2e"] < 195
    # the default deadline, or several parts: each part's own guard
    assert guard_of(extras, "e2e") == pytest.approx(gpu_session.GUARDS["e2e"], abs=1)
    both = ["--part", "e2e,env", "--deadline", "500"]
    assert guard_of(both, "e2e") == pytest.approx(gpu_session.GUARDS["e2e"], abs=1)
    # a deadline below the guard still cuts it
    assert guard_of([*extras, "--deadline", "100"], "e2e") == pytest.approx(85, abs=1)


def test_extraction_comes_before_the_steps_outside_every_guard(tmp_path, monkeypatch):
    def slow_extract(tar, dest):  # GNU tar on a busy machine: 30 s where it took 5
        time.sleep(3)
        (dest / "cifar10-jpg").mkdir()
        return dest

    def env_body(s, log):
        root = s.cifar_root()
        return dict(root=str(root), guard_left=s.guard("env"))

    monkeypatch.setattr(gpu_session, "extract", slow_extract)
    monkeypatch.setitem(gpu_session.GUARDS, "env", 2)
    monkeypatch.setitem(gpu_session.PART_BODIES, "env", env_body)
    results = gpu_session.main(["--part", "env", "--out", str(tmp_path / "out")])
    assert results["data"]["status"] == "ok" and results["data"]["seconds"] >= 3
    assert results["env"]["guard_left"] > 1  # the 3 s were not the env part's
    assert results["env"]["root"] == results["data"]["root"]  # one copy, extracted once
    assert not os.path.exists(results["data"]["root"])  # removed at the end of the call


def test_a_figure_file_a_kill_left_half_written_keeps_the_part(tmp_path):
    half = tmp_path / "e2e.json"
    half.write_text('{"part": "e2e", "rows": [{"key": "hand-st')
    result = gpu_session.with_figures(dict(status="timeout", rc=None), half)
    assert result["status"] == "timeout" and "e2e.json" in result["figures_error"]


def test_equal_epochs_counts_steps_not_lightnings_epochs():
    # Lightning's current_epoch counts an epoch cut part way by a time limit as done: 969 of
    # 970 steps read as 10 epochs of 10
    whole = dict(steps=970, steps_per_epoch=97, epochs_done=10.0)
    cut = dict(steps=969, steps_per_epoch=97, epochs_done=969 / 97)
    assert gpu_session.trained_all(whole, 10)
    assert not gpu_session.trained_all(cut, 10)
    assert not gpu_session.trained_all(dict(epochs_done=10), 10)  # no steps: not known


def test_a_pair_run_stops_training_by_its_guard_counted_from_its_start(tmp_path, monkeypatch):
    """Lightning's max_time counts from the fit's start, after the imports and the resident
    decode, and leaves nothing for the kNN: each run gets a wall-clock time instead."""
    calls = []
    monkeypatch.setattr(
        gpu_session.Session,
        "script",
        lambda s, log, module, argv, guard: calls.append(argv) or {"status": "ok"},
    )
    a = gpu_session.parse_args(["--out", str(tmp_path), "--cifar-root", str(tmp_path)])
    session = gpu_session.Session(a)
    gpu_session.tta(session, tmp_path / "x.log", "cpu", 10, 0, 100.0, "epochs")
    shutil.rmtree(session.tmp, ignore_errors=True)
    tta = load_script("time_to_accuracy").parse_args(calls[0])  # the script takes what it is given
    assert tta.stop_by == pytest.approx(time.time() + 100 - gpu_session.KILL_MARGIN_S, abs=2)
    assert tta.reserve_s == gpu_session.KNN_RESERVE_S and tta.minutes == 0
    # a minute at least outside training: the start, the kNN the run keeps time for, the kill
    assert gpu_session.RUN_START_S + tta.reserve_s + gpu_session.KILL_MARGIN_S >= 60


# -- the tests part -----------------------------------------------------------------------------
def test_the_tests_part_leaves_the_compile_tests_and_runs_each_test_once():
    call = dict(gpu_session.pytest_runs("call"))
    gpu, cpu = call["gpu"], call["gpu_data_path_cpu_tests"]
    for test in gpu_session.COMPILE_TESTS:
        assert f"--deselect={test}" in gpu  # cold inductor compiles: minutes
        path, name = test.split("::")
        assert f"def {name}(" in (REPO / path).read_text()  # still the test's name
    assert gpu[gpu.index("-m", 2) + 1] == "gpu"  # -m after `python -m pytest`
    assert cpu[cpu.index("-m", 2) + 1] == "not slow and not gpu"  # the first run had the gpu ones
    assert "-v" in gpu and "-q" not in gpu  # a line per test: a kill keeps the outcomes
    (key, compile_run), *others = gpu_session.pytest_runs("compile")
    assert key == "gpu_compile" and not others
    assert compile_run[-len(gpu_session.COMPILE_TESTS) :] == gpu_session.COMPILE_TESTS


PYTEST_FILE = """
import time
import pytest

def test_passes():
    pass

def test_fails():
    assert False

@pytest.mark.parametrize("case", ["a b", "c"])
def test_params(case):
    pass

def test_hangs():
    time.sleep(120)
"""


def test_a_killed_pytest_run_keeps_each_tests_outcome(tmp_path):
    (tmp_path / "test_some.py").write_text(PYTEST_FILE)
    a = gpu_session.parse_args(["--part", "tests", "--out", str(tmp_path / "out")])
    a.out.mkdir()
    session = gpu_session.Session(a)
    (_, cmd), _ = gpu_session.pytest_runs("call")
    cmd = [*cmd[: cmd.index("-m", 2)], "test_some.py"]  # the part's pytest, on these tests
    log = a.out / "tests.log"
    run = session.process(log, cmd, 25, cwd=tmp_path)  # test_hangs outruns it
    shutil.rmtree(session.tmp, ignore_errors=True)
    assert run["status"] == "timeout"
    report = gpu_session.pytest_report(log.read_text())
    assert report["incomplete"] and report["passed"] == 3 and report["failed"] == 1, report
    assert report["not_passed"] == {"test_some.py::test_fails": "failed"}
    if "-n" in cmd:  # xdist names the test that began, and never ended
        assert report["unfinished"] == ["test_some.py::test_hangs"]
    summary = "\n".join(gpu_session.tests_lines("gpu", {**run, **report}))
    assert "failed: test_some.py::test_fails" in summary


def test_pytest_report_reads_both_verbose_formats():
    xdist = "\n".join(
        [
            "4 workers [3 items]",
            "tests/a.py::test_x[p q]",
            "[gw1] [ 33%] PASSED tests/a.py::test_x[p q] ",  # xdist ends it with a space
            "[gw0] [ 66%] SKIPPED tests/a.py::test_y",
            "tests/b.py::test_z",
            "[gw0] [100%] ERROR tests/b.py::test_z",
            "SKIPPED [1] tests/a.py:9: no CUDA",
            "=========== 1 passed, 1 skipped, 1 error in 3.10s ===========",
        ]
    )
    report = gpu_session.pytest_report(xdist)
    assert report["passed"] == 1 and report["skipped"] == 1 and "incomplete" not in report
    assert report["not_passed"] == {"tests/a.py::test_y": "skipped", "tests/b.py::test_z": "error"}
    assert report["unfinished"] == []
    plain = "tests/a.py::test_x PASSED      [ 50%]\ntests/a.py::test_y SKIPPED (no CUDA)  [100%]"
    report = gpu_session.pytest_report(plain)
    assert report == {
        "passed": 1,
        "skipped": 1,
        "incomplete": True,
        "not_passed": {"tests/a.py::test_y": "skipped"},
        "unfinished": [],
    }


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


def test_the_tests_part_reads_the_copy_extracted_before_the_steps(tmp_path, monkeypatch):
    """The tests' CIFAR fixture extracted the tarball again (about 5 s of the part's guard):
    the part hands it the session's copy."""
    a = gpu_session.parse_args(["--part", "tests", "--out", str(tmp_path / "out")])
    a.out.mkdir()
    session = gpu_session.Session(a)
    session._root = tmp_path / "cifar10-jpg"
    session.part_start["tests"] = time.monotonic()  # as Session.run sets it
    envs = []

    def process(log, cmd, guard, cwd=None, env=None):
        envs.append(env)
        return dict(status="ok", seconds=0.0)

    monkeypatch.setattr(session, "process", process)
    log = tmp_path / "tests.log"
    log.touch()
    gpu_session.part_tests(session, log)
    assert envs and all(e["SIMCLR_CIFAR10_JPG"] == str(session._root) for e in envs)


def test_the_env_check_fails_only_on_what_the_benchmarks_need():
    """Without the CLI's wheels (``gpu_prepare.sh --no-wheels``, which the runbook offers) the
    env part said "failed: fix on the CPU first" for the two CLI modules alone."""
    from tests.test_benchmarks import load_script

    status = load_script("gpu_env").env_status
    no_cli = {"simclr_lightning.cli": "ModuleNotFoundError: No module named 'jsonargparse'"}
    assert status(no_cli, {"gpu_augment": "ok 3 ms"}) == "ok"
    assert status({"simclr_lightning.loss": "ImportError: x"}, {}) == "failed"
    assert status({}, {"gpu_augment": "FAILED RuntimeError: x"}) == "failed"


def test_gpu_prepare_without_the_shared_data_says_where_it_looked(tmp_path):
    """It failed in md5sum (``FAILED open or read``), naming neither the folder it read nor
    the setting that moves it."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO / "benchmarks" / "gpu_prepare.sh", tmp_path / "benchmarks")
    env = {**os.environ, "SIMCLR_SHARED_DATA": str(tmp_path / "nowhere")}
    run = subprocess.run(["bash", "benchmarks/gpu_prepare.sh", "--no-wheels"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"gpu_prepare.sh: error: no {tmp_path / 'nowhere'}/cifar10-jpg.tar.gz to copy: set "
        "SIMCLR_SHARED_DATA to the folder that holds it"
    ]
