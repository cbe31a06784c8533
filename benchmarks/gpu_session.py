"""Issue 11's measurements on a lent GPU, in one device call that fits the session's budget.

    python benchmarks/gpu_session.py                        # the call: every part, about 9 min
    python benchmarks/gpu_session.py --part e2e --e2e-rows compile-default --deadline 200
    python benchmarks/gpu_session.py --tiny                 # every part, CPU, seconds

A session that is lent a GPU has 15 minutes of device time in all, machine start included, and
a command lasts at most 10 minutes, so nothing may be improvised there: ``benchmarks/README.md``
("GPU session runbook") gives the call. ``--part`` is a comma list of steps run in order; a
step ``a+b`` runs its parts at the same time. Only parts whose speed is not measured share
the machine: the GPU tests and the equal-epochs kNN pair (``tests+tta-epochs``, whose two
runs also train side by side), so the timed parts (``e2e``, ``tta-budget``,
``throughput``) each have the GPU and the CPUs alone.

Each part runs its programs in processes under its own time guard, cut further so the whole
call ends by ``--deadline`` seconds. It writes ``<part>.log`` (everything its programs printed;
the pair writes ``tta-epochs-gpu.log`` and ``tta-epochs-cpu.log``), and every part's figures go
into ``session.json`` under ``--out`` (default ``$OUT``), rewritten as each part ends, so a
killed call keeps what finished: 8 files, what a device call brings back. The summary table,
the issue's targets against this call's figures and the next call to make print last.

Parts: ``env`` (``gpu_env.py``: versions, nvidia-smi, every import, first contact of nvJPEG,
GPUAugment and a bf16 channels-last step), ``tests`` (``pytest -m gpu``, then the CPU tests of
the GPU data path), ``e2e`` (``e2e_throughput.py``, the rows of ``--e2e-rows``), ``tta-budget``
(the GPU pipeline for ``--budget-minutes``; its schedule's epochs are what the e2e part's SGD
row measured fits in the budget, as a user would choose them), ``throughput``
(``throughput.py``: ResNet-50 at 224 px with and without nvJPEG, the augmentation alone and
the fidelity table; the CIFAR pipelines are the e2e part's rows) and ``tta-epochs`` (the GPU
and the CPU pipeline side by side, same seed, same ``--epochs``-long schedule: the
no-accuracy-cost check).

``--tiny`` runs every part's code path at tiny sizes on the CPU, in this process, one part
after the other (no guards), on a few images of the packaged CIFAR-10 sample; ``tests`` is
skipped there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("env", "tests", "e2e", "tta-budget", "throughput", "tta-epochs")
# The call. The timed parts come first, each alone: e2e (the headline figure, and the speeds
# that size both kNN schedules), tta-budget, throughput (it writes its figures at its end).
# Last, side by side, the parts whose speed does not count; the pair's runs shorten their
# schedule to the time left, so a late call still ends with an equal-epochs figure.
DEFAULT_STEPS = "env,e2e,tta-budget,throughput,tests+tta-epochs"
# The e2e rows of the call: the targets' rows, the progress-bar decision and SGD (the recipe
# of tta-budget); the others (compiled, a sync per step, LARS's loop) fit a second call.
DEFAULT_E2E_ROWS = "hand-step,model-alone,e2e,e2e-bar1,e2e-sgd,cpu-pipeline"
# seconds each part may take at full size (the call's --deadline cuts them further)
GUARDS = {
    "env": 60,
    "tests": 180,
    "e2e": 150,
    "tta-budget": 240,
    "throughput": 120,
    "tta-epochs": 180,
}
# a time_to_accuracy.py run outside training (start, resident decode, kNN) as planned for
RUN_OVERHEAD_S = 30
# seconds of a budget run's fit that train no epoch of the schedule (cuDNN autotuning, the
# first steps): kept out of the schedule's length
BUDGET_START_S = 10
# the equal-epochs pair: its epochs, fewer where the CPU pipeline is too slow to train them in
# the part's time at the share of its speed it keeps beside the GPU run and the tests
PAIR_EPOCHS, PAIR_MIN_EPOCHS, PAIR_CPU_SHARE = 10, 4, 0.7
CIFAR_EPOCH = 49_664  # CIFAR-10's 50,000 training images in full batches of 512
TARGETS = dict(e2e_images_per_s=18_000, e2e_ratio=0.90, r50_nvjpeg=1_700, knn_gap=0.5, knn=75.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--part",
        default=DEFAULT_STEPS,
        help=f"comma list of steps, a step one of {', '.join(PARTS)} or several joined by + "
        f"(run at the same time); default {DEFAULT_STEPS}",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-session-out")
    p.add_argument("--cifar-tar", default=str(REPO / ".gpu-data" / "cifar10-jpg.tar.gz"))
    p.add_argument("--cifar-root", default=None, help="an extracted copy (else: the tarball's)")
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole call")
    p.add_argument(
        "--epochs", type=int, default=None, help="tta-epochs: epochs of each run (default: below)"
    )
    p.add_argument("--budget-minutes", type=float, default=3.0)
    p.add_argument("--budget-epochs", type=int, default=None, help="default: see the docstring")
    p.add_argument("--e2e-rows", default=DEFAULT_E2E_ROWS, help="e2e_throughput.py --rows")
    p.add_argument("--tiny", action="store_true", help="CPU dry run of every part, in-process")
    a = p.parse_args(argv)
    a.steps = [[x for x in step.split("+") if x] for step in a.part.split(",") if step]
    a.parts = [part for step in a.steps for part in step]
    unknown = sorted(set(a.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if len(set(a.parts)) != len(a.parts):
        p.error(f"--part names a part twice: {a.part}")
    a.out = Path(a.out)
    return a


# -- running a part ----------------------------------------------------------------------------
class Session:
    """Runs the parts: the clock, the deadline, the output folder and the CIFAR copy."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.start = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-session-"))
        self.results: dict[str, dict] = {}
        self._root: Path | None = None
        self._root_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.part_start: dict[str, float] = {}

    def remaining(self) -> float:
        return self.a.deadline - (time.monotonic() - self.start)

    def cifar_root(self) -> Path:
        """The CIFAR-10 JPEG folder: given, extracted from the carried tarball once, or (tiny)
        4 training and 2 validation images per class of the packaged sample."""
        with self._root_lock:  # parts that run together share one copy
            if self._root is None:
                if self.a.cifar_root:
                    self._root = Path(self.a.cifar_root)
                elif self.a.tiny:
                    self._root = tiny_cifar(self.tmp / "cifar-tiny")
                else:
                    self._root = extract(Path(self.a.cifar_tar), self.tmp) / "cifar10-jpg"
        return self._root

    def run_step(self, parts: list[str]) -> None:
        """Run the parts of one step, at the same time when there are several (one after the
        other with ``--tiny``: its scripts run in this process, their output redirected)."""
        if len(parts) == 1 or self.a.tiny:
            for part in parts:
                self.run(part, lambda log, part=part: PART_BODIES[part](self, log))
            return
        threads = [
            threading.Thread(
                target=self.run, args=(part, lambda log, part=part: PART_BODIES[part](self, log))
            )
            for part in parts
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def run(self, part: str, body: Callable[[Path], dict]) -> dict:
        """Run ``body(log)`` for ``part`` and add its figures to ``session.json``."""
        log = self.a.out / f"{part}.log"
        began = self.part_start[part] = time.monotonic()
        try:
            result = body(log)
        except Exception as err:  # a part's failure must not cost the others
            result = dict(status="error", error=f"{type(err).__name__}: {err}"[:2000])
        result = {**result, "part": part}
        result.setdefault("status", "ok")
        result["seconds"] = round(time.monotonic() - began, 1)
        result["began_s"] = round(began - self.start, 1)
        with self._write_lock:
            self.results[part] = result
            write_atomic(
                self.a.out / "session.json", json.dumps(self.results, indent=1, default=str)
            )
        return result

    def guard(self, part: str) -> float:
        """The seconds ``part`` may still take: what is left of its own guard, cut by the
        call's deadline."""
        used = time.monotonic() - self.part_start[part]
        return min(GUARDS[part] - used, self.remaining() - 15)

    def script(self, log: Path, module: str, argv: list[str], guard: float) -> dict:
        """Run ``benchmarks/<module>.py argv``: a process under ``guard`` seconds, its output
        appended to ``log``; with ``--tiny`` its ``main(argv)`` in this process instead."""
        if self.a.tiny:
            return self.in_process(log, module, argv)
        if guard < 30:
            return dict(status="skipped", error=f"{guard:.0f} s left before the deadline")
        cmd = [sys.executable, str(HERE / f"{module}.py"), *argv]
        return self.process(log, cmd, guard)

    def process(self, log: Path, cmd: list[str], guard: float, cwd: Path = REPO, env=None) -> dict:
        """``cmd`` in a process group of its own, killed whole (loader workers, pytest's
        workers) when it outruns ``guard``, so nothing it started holds the GPU after it."""
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}  (guard {guard:.0f} s)\n")
            out.flush()
            environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=environ,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=max(guard, 0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.write(f"\n[gpu_session] killed after its guard of {guard:.0f} s\n")
                return dict(status="timeout", rc=None)
        return dict(status="ok" if rc == 0 else "failed", rc=rc)

    def in_process(self, log: Path, module: str, argv: list[str]) -> dict:
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        main = importlib.import_module(module).main
        with log.open("a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            print(f"$ {module}.main({argv})", flush=True)
            try:
                main(argv)
            except SystemExit as err:  # argparse errors
                return dict(status="failed", rc=err.code)
        return dict(status="ok", rc=0)


def extract(tar: Path, dest: Path) -> Path:
    """The tarball's files under ``dest``: GNU tar where there is one (60,000 files: seconds,
    where Python's tarfile takes half a minute)."""
    if not tar.is_file():
        raise FileNotFoundError(f"{tar} is missing: run benchmarks/gpu_prepare.sh")
    if shutil.which("tar"):
        cmd = ["tar", "-xzf", str(tar), "-C", str(dest), "--no-same-owner"]
        subprocess.run([*cmd, "--no-same-permissions"], check=True)
    else:
        with tarfile.open(tar) as archive:
            archive.extractall(dest, filter="data")
    return dest


def write_atomic(path: Path, text: str) -> None:
    """A file a kill never leaves half written: the call may be stopped at any moment."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tiny_cifar(dest: Path, train: int = 4, val: int = 2) -> Path:
    """A CIFAR-shaped ImageFolder of symlinks to the first images of each class of the sample."""
    from simclr_lightning import sample_root

    for split, count in (("train", train), ("val", val)):
        for class_dir in sorted((sample_root() / split).iterdir()):
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (out / image.name).symlink_to(image)
    return dest


def with_figures(run: dict, path: Path) -> dict:
    """A finished run's status, with the figures its script wrote to ``path`` (if it did); a
    figure file that failed checks of its own keeps that status."""
    figures = json.loads(path.read_text()) if path.is_file() else {}
    if run["status"] == "ok" and figures.get("status") not in (None, "ok"):
        run = {**run, "status": figures["status"]}
    return {**figures, **run}


# -- the parts ---------------------------------------------------------------------------------
def part_env(s: Session, log: Path) -> dict:
    out = s.tmp / "env.json"
    argv = ["--cifar-root", str(s.cifar_root()), "--json", str(out)]
    return with_figures(s.script(log, "gpu_env", argv, s.guard("env")), out)


def part_tests(s: Session, log: Path) -> dict:
    if s.a.tiny:
        return dict(status="skipped", error="--tiny")
    if s.guard("tests") < 30:  # as script(): pytest killed at once would read as a timeout
        return dict(status="skipped", error=f"{s.guard('tests'):.0f} s left before the deadline")
    env = {  # the tests' cifar_jpg_root fixture reads the carried tarball
        "SIMCLR_SHARED_DATA": str(Path(s.a.cifar_tar).parent),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    pytest = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist"):  # the machine's cores, beside the pair's runs
        pytest += ["-n", "4", "--dist", "loadfile"]
    try:
        importlib.import_module("jsonargparse")
        gpu_files = ["tests"]
    except ImportError:  # the CLI's test modules would not import: only the files with gpu tests
        gpu_files = [str(f.relative_to(REPO)) for f in marked_gpu(REPO / "tests")]
    result = {}
    for key, args in (
        ("gpu", ["-m", "gpu", *gpu_files]),
        ("gpu_data_path_cpu_tests", ["-m", "not slow", *CPU_GPU_PATH_TESTS]),
    ):
        before = log.stat().st_size if log.exists() else 0
        run = s.process(log, pytest + args, s.guard("tests"), env=env)
        text = log.read_text()[before:]
        result[key] = {**run, **pytest_counts(text)}
    bad = any(r["status"] != "ok" for r in result.values())
    return {**result, "status": "failed" if bad else "ok", "paths": gpu_files}


CPU_GPU_PATH_TESTS = [
    "tests/data/gpu",
    "tests/data/test_encoded.py",
    "tests/data/test_device_store.py",
]


def marked_gpu(tests: Path) -> list[Path]:
    return sorted(f for f in tests.rglob("test_*.py") if "pytest.mark.gpu" in f.read_text())


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``3 passed, 1 skipped in 2.0s``)."""
    counted = r"\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s"
    lines = [line for line in text.splitlines() if re.search(counted, line)]
    if not lines:
        return {}
    return {k: int(n) for n, k in re.findall(r"(\d+) ([a-z]+)", lines[-1])}


def part_throughput(s: Session, log: Path) -> dict:
    """ResNet-50 at 224 px (the nvJPEG target), the augmentation alone and the fidelity
    table; the CIFAR pipelines are the e2e part's rows, through the product's Trainer."""
    out = s.tmp / "throughput.json"
    argv = ["--cifar-root", str(s.cifar_root()), "--json", str(out), "--cifar-rows", "augment"]
    if s.a.tiny:
        argv += ["--tiny", "--steps", "1", "--warmup", "0", "--cifar-batch", "2"]
        argv += ["--imagenet-batch", "2", "--imagenet-size", "32", "--jpegs", "4"]
        argv += ["--workers", "0"]
    return with_figures(s.script(log, "throughput", argv, s.guard("throughput")), out)


def part_e2e(s: Session, log: Path) -> dict:
    out = s.tmp / "e2e.json"
    argv = ["--root", str(s.cifar_root()), "--json", str(out), "--rows", s.a.e2e_rows]
    argv += ["--tiny"] if s.a.tiny else []
    return with_figures(s.script(log, "e2e_throughput", argv, s.guard("e2e")), out)


def tta(
    s: Session, log: Path, augment: str, epochs: int, minutes: float, guard: float, tag: str
) -> dict:
    out = s.tmp / f"tta-{tag}-{augment}.json"
    argv = ["--root", str(s.cifar_root()), "--augment", augment, "--seed", "0"]
    argv += ["--epochs", str(epochs), "--minutes", str(minutes), "--json", str(out)]
    argv += ["--tiny"] if s.a.tiny else []
    return with_figures(s.script(log, "time_to_accuracy", argv, guard), out)


def part_tta_epochs(s: Session, log: Path) -> dict:
    """The GPU and the CPU pipeline side by side (one after the other with ``--tiny``), same
    seed, same ``--epochs``-long schedule: what is compared is their kNN, never their speed.
    Each run's training stops at the time its guard leaves (then the epochs are unequal, and
    the summary says so) rather than being killed with no figure."""
    guard = s.guard("tta-epochs")
    minutes = round(max(guard - RUN_OVERHEAD_S, 0) / 60, 2)
    epochs, why = pair_epochs(s, minutes * 60)
    if minutes < 0.5 and not s.a.tiny:
        return dict(status="skipped", error=f"{guard:.0f} s of the call left", epochs=epochs)
    runs: dict[str, dict] = {}

    def one(augment: str) -> None:
        own_log = log.with_name(f"{log.stem}-{augment}.log")
        try:
            runs[augment] = tta(s, own_log, augment, epochs, minutes, guard, "epochs")
        except Exception as err:
            runs[augment] = dict(status="error", error=f"{type(err).__name__}: {err}"[:2000])

    if s.a.tiny:
        one("gpu")
        one("cpu")
    else:
        threads = [threading.Thread(target=one, args=(x,)) for x in ("gpu", "cpu")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    cpu, gpu = runs["cpu"], runs["gpu"]
    result: dict = dict(epochs=epochs, epochs_why=why, cpu=cpu, gpu=gpu)
    if "knn_top1" in cpu and "knn_top1" in gpu:
        result["knn_gap"] = gpu["knn_top1"] - cpu["knn_top1"]
        result["equal_epochs"] = cpu["epochs_done"] == gpu["epochs_done"] == epochs
    bad = any(r.get("status") != "ok" for r in runs.values())
    result["status"] = "failed" if bad else "ok"
    return result


def pair_epochs(s: Session, train_s: float) -> tuple[int, str]:
    """The pair's schedule: given; else ``PAIR_EPOCHS``, or fewer (never under
    ``PAIR_MIN_EPOCHS``) where the CPU pipeline, at ``PAIR_CPU_SHARE`` of the speed the e2e
    part measured for it alone, would not train them in ``train_s``."""
    if s.a.epochs:
        return s.a.epochs, "--epochs"
    rate = e2e_rate(s.results, "cpu-pipeline")
    if not rate or s.a.tiny:
        return PAIR_EPOCHS, "the default (no e2e cpu-pipeline row in this call)"
    fits = math.floor(train_s * PAIR_CPU_SHARE * rate / CIFAR_EPOCH)
    epochs = max(PAIR_MIN_EPOCHS, min(PAIR_EPOCHS, fits))
    return epochs, (
        f"{fits} fit {train_s:.0f} s at {PAIR_CPU_SHARE:.0%} of the e2e cpu-pipeline row's "
        f"{rate:,.0f} images/s; {PAIR_MIN_EPOCHS} to {PAIR_EPOCHS}"
    )


def e2e_rate(results: dict[str, dict], key: str) -> float | None:
    """Images/s of one e2e row of this call, if it ran."""
    rows = results.get("e2e", {}).get("rows", [])
    return next((r.get("images_per_s") for r in rows if r.get("key") == key), None)


def budget_epochs(s: Session) -> tuple[int, str]:
    """The schedule's length for the budget run: given; else the epochs that the speed the
    e2e part measured for the product path with SGD (the budget run's optimizer) fits in the
    budget, less its start; else time_to_accuracy.py's default."""
    if s.a.budget_epochs:
        return s.a.budget_epochs, "--budget-epochs"
    for key in ("e2e-sgd", "e2e"):
        rate = e2e_rate(s.results, key)
        if rate and not s.a.tiny:
            train_s = s.a.budget_minutes * 60 - BUDGET_START_S
            epochs = max(1, math.floor(train_s * rate / CIFAR_EPOCH))
            return epochs, f"fits {train_s:.0f} s at the e2e {key} row's {rate:,.0f} images/s"
    return 65, "time_to_accuracy.py's default (about 18k images/s for 3 minutes)"


def part_tta_budget(s: Session, log: Path) -> dict:
    epochs, why = budget_epochs(s)
    guard = s.guard("tta-budget")
    if guard < s.a.budget_minutes * 60 + RUN_OVERHEAD_S and not s.a.tiny:  # killed mid-run
        return dict(status="skipped", error=f"{guard:.0f} s of the call left")
    run = tta(s, log, "gpu", epochs, s.a.budget_minutes, guard, "budget")
    return {**run, "schedule_epochs": epochs, "schedule_epochs_why": why}


PART_BODIES = {
    "env": part_env,
    "tests": part_tests,
    "e2e": part_e2e,
    "tta-budget": part_tta_budget,
    "tta-epochs": part_tta_epochs,
    "throughput": part_throughput,
}


# -- the summary -------------------------------------------------------------------------------
def fmt(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def summary_lines(results: dict[str, dict]) -> list[str]:
    """One block per part in the order they began, then the issue's targets met or missed by
    this call's figures."""
    lines, targets = [], []
    for part, r in sorted(results.items(), key=lambda item: item[1].get("began_s", 0)):
        began = r.get("began_s", 0)
        head = f"{part:<11} {r['status']:<8} {r['seconds']:>6.0f} s from {began:>4.0f} s"
        if r.get("error"):
            head += f"  {r['error'][:150]}"
        lines.append(head)
        if part == "env":
            lines.append(
                f"    {r.get('gpu')} | torch {r.get('torch')} | torchvision "
                f"{r.get('torchvision')} | lightning {r.get('lightning')} | "
                f"{len(r.get('import_failures') or {})} import failures"
            )
            for name, text in (r.get("checks") or {}).items():
                lines.append(f"    {name}: {text[:120]}")
        elif part == "tests":
            for key in ("gpu", "gpu_data_path_cpu_tests"):
                if key in r:
                    counts = {k: v for k, v in r[key].items() if k not in ("status", "rc")}
                    lines.append(f"    {key}: {r[key]['status']} {counts}")
        elif part in ("throughput", "e2e"):
            for row in r.get("rows", []):
                rate, ratio = row.get("images_per_s"), row.get("ratio")
                tail = f" {ratio:5.2f} x alone" if ratio else ""
                text = row.get("error") or row.get("note") if rate is None else fmt(rate, 0)
                lines.append(f"    {row['name'][:62]:<62} {text}{tail}")
            targets += throughput_targets(part, r)
        elif part == "tta-epochs":
            lines.append(f"    {r.get('epochs')} epochs each: {r.get('epochs_why')}")
            for augment in ("gpu", "cpu"):
                run = r.get(augment, {})
                lines.append(f"    {augment}: {tta_line(run)}")
            if "knn_gap" in r:
                met = abs(r["knn_gap"]) <= TARGETS["knn_gap"] or r["knn_gap"] > 0
                equal = "" if r["equal_epochs"] else " (UNEQUAL epochs: see the runs)"
                targets.append(
                    f"kNN gap GPU - CPU at equal epochs: {r['knn_gap']:+.2f} points "
                    f"(target >= -0.5): {'met' if met else 'MISSED'}{equal}"
                )
        elif part == "tta-budget":
            lines.append(f"    {tta_line(r)}; schedule {r.get('schedule_epochs')} epochs")
            if "knn_top1" in r:
                met = r["knn_top1"] >= TARGETS["knn"]
                targets.append(
                    f"kNN after {r.get('minutes')} min: {r['knn_top1']:.2f}% (target 75%): "
                    f"{'met' if met else 'MISSED'}"
                )
    if targets:
        lines += ["", "targets (issue 11), this call's figures:"] + [f"  {t}" for t in targets]
    return lines


def tta_line(run: dict) -> str:
    if "knn_top1" not in run:
        return f"{run.get('status')} {run.get('error') or ''}".strip()
    return (
        f"kNN {run['knn_top1']:.2f}% | epochs {run['epochs_done']} of {run['epochs_planned']} | "
        f"train {run['train_s']:.0f} s ({fmt(run['train_images_per_s'])} img/s) | setup "
        f"{run['setup_s']:.0f} s"
    )


def throughput_targets(part: str, r: dict) -> list[str]:
    rows = {row["name"]: row for row in r.get("rows", [])}
    out = []
    if part == "e2e":
        row = next((v for k, v in rows.items() if k.startswith("e2e: GPU pipeline")), None)
        if row and row.get("images_per_s"):
            rate, ratio = row["images_per_s"], row.get("ratio") or 0
            ok = rate >= TARGETS["e2e_images_per_s"] and ratio >= TARGETS["e2e_ratio"]
            out.append(
                f"CIFAR R18 end to end: {rate:,.0f} img/s, {ratio:.2f} x model alone "
                f"(targets 18,000 and 0.90): {'met' if ok else 'MISSED'}"
            )
    else:
        row = next((v for k, v in rows.items() if "nvJPEG" in k), None)
        if row and row.get("images_per_s") and "224px" in row["name"]:
            ok = row["images_per_s"] >= TARGETS["r50_nvjpeg"]
            out.append(
                f"ResNet-50 224 px with nvJPEG: {row['images_per_s']:,.0f} img/s "
                f"(target 1,700): {'met' if ok else 'MISSED'}"
            )
    return out


# A second call, made at once while the machine is warm, when the first left device time
# (the tool's status says how much) and every part ran to its end: the compiled rows.
EXTRAS = "--part e2e --e2e-rows model-alone,e2e,compile-default,compile-reduce-overhead"
EXTRAS_DEADLINE = 210


def next_call(results: dict[str, dict], a: argparse.Namespace) -> list[str]:
    """What to run next: the parts this call had no time for, else the extras; the parts that
    failed are to be fixed here first (their logs say what)."""
    status = {part: results.get(part, {}).get("status", "not run") for part in a.parts}
    redo = [
        p
        for p, st in status.items()
        if st in ("skipped", "timeout", "not run") and results.get(p, {}).get("error") != "--tiny"
    ]
    broken = [p for p, st in status.items() if st in ("failed", "error")]
    lines = [""]
    if broken:
        logs = ", ".join(f"{p}.log" for p in broken)
        lines.append(f"failed: {', '.join(broken)}: fix on the CPU first ({logs})")
    if redo:
        deadline = sum(GUARDS[p] for p in redo) + 15
        args = f"--part {','.join(redo)} --deadline {deadline}"
        lines.append(f"next, at once and only with {deadline + 30} s of device time left: {args}")
    else:
        lines.append(
            f"next, at once and only with {EXTRAS_DEADLINE + 30} s of device time left "
            f"(optional): {EXTRAS} --deadline {EXTRAS_DEADLINE}; else give the machine back"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, dict]:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.tiny:  # on a shared small CPU, OpenMP threads spin-waiting for each other cost 10x
        import torch

        torch.set_num_threads(1)
    s = Session(a)
    try:
        for step in a.steps:
            s.run_step(step)
    finally:
        shutil.rmtree(s.tmp, ignore_errors=True)
    print(f"\n== gpu_session: {a.part} | logs and figures in {a.out} ==")
    print("\n".join(summary_lines(s.results) + next_call(s.results, a)))
    return s.results


if __name__ == "__main__":
    main()
