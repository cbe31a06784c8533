"""Issue 11's measurements on a lent GPU, in one device call that fits the session's budget.

    python benchmarks/gpu_session.py                        # the call: every part, about 9 min
    python benchmarks/gpu_session.py --part e2e --e2e-rows compile-default --deadline 200
    python benchmarks/gpu_session.py --part tests --tests compile --deadline 270
    python benchmarks/gpu_session.py --tiny                 # every part, CPU, seconds

A session that is lent a GPU has 15 minutes of device time in all, machine start included, and
a command lasts at most 10 minutes, so nothing may be improvised there: ``benchmarks/README.md``
("GPU session runbook") gives the call. ``--part`` is a comma list of steps run in order; a
step ``a+b`` runs its parts at the same time. Only parts whose speed is not measured share
the machine: the GPU tests and the equal-epochs kNN pair (``tests+tta-epochs``, whose two
runs also train side by side), so the timed parts (``e2e``, ``tta-budget``,
``throughput``) each have the GPU and the CPUs alone.

First the carried CIFAR-10 tarball is extracted, once, to ``/dev/shm`` where it has room
(else to a temporary folder), outside every part's guard but inside the deadline. Each part
runs its programs in processes under its own time guard, cut further so the whole call ends
by ``--deadline`` seconds; a call of one part with an explicit ``--deadline`` gives that part
all of it. It writes ``<part>.log`` (everything its programs printed;
the pair writes ``tta-epochs-gpu.log`` and ``tta-epochs-cpu.log``), and every part's figures go
into ``session.json`` under ``--out`` (default ``$OUT``), rewritten as each part ends, so a
killed call keeps what finished: 8 files, what a device call brings back. The summary table,
the issue's targets against this call's figures and the next call to make print last.

Parts: ``env`` (``gpu_env.py``: versions, nvidia-smi, every import, first contact of nvJPEG,
GPUAugment and a bf16 channels-last step), ``tests`` (``pytest -m gpu`` less the compile
tests, which ``--tests compile`` runs alone, then the CPU tests of the GPU data path),
``e2e`` (``e2e_throughput.py``, the rows of ``--e2e-rows``), ``tta-budget``
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
    "tta-budget": 255,
    "throughput": 120,
    "tta-epochs": 180,
}
# the call's default deadline, and the most a call may ask: the runbook's timeout_s is the
# deadline + 30, at most 570 (the device tool's limit is 600 s a command)
DEADLINE, MAX_DEADLINE = 540, 540
# seconds planned for extracting the CIFAR tarball (GNU tar, 60,000 files) before the steps
EXTRACT_S = 15
# /dev/shm holds the extracted copy (240 MB in 4 KiB pages) only with this much free, leaving
# room for the loader workers' shared memory
SHM_NEEDED = 1 << 30
# a time_to_accuracy.py run outside training: its start (imports, resident decode) before,
# and what it keeps after training for the kNN over 60,000 images and its exit (--reserve-s);
# each run also gets --stop-by, the wall-clock time its guard kills it less KILL_MARGIN_S
RUN_START_S, KNN_RESERVE_S, KILL_MARGIN_S = 15, 45, 5
RUN_OVERHEAD_S = RUN_START_S + KNN_RESERVE_S
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
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help=f"seconds for the whole call (default {DEADLINE}); with one part, that part's guard",
    )
    p.add_argument(
        "--tests",
        choices=["call", "compile"],
        default="call",
        help="tests part: the call's GPU tests (all but the compile tests) and the CPU tests of "
        "the GPU data path; or the compile tests alone (cold compiles: minutes)",
    )
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
    a.deadline_given = a.deadline is not None
    a.deadline = DEADLINE if a.deadline is None else a.deadline
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
        self._root_error: str | None = None
        self._root_lock = threading.Lock()
        self.shm: Path | None = None
        self._write_lock = threading.Lock()
        self.part_start: dict[str, float] = {}

    def remaining(self) -> float:
        return self.a.deadline - (time.monotonic() - self.start)

    def cifar_root(self) -> Path:
        """The CIFAR-10 JPEG folder: given, extracted from the carried tarball once, or (tiny)
        4 training and 2 validation images per class of the packaged sample. A failed
        extraction is not tried again by each part: they fail with its error."""
        with self._root_lock:  # parts that run together share one copy
            if self._root_error:
                raise RuntimeError(f"the CIFAR copy: {self._root_error}")
            if self._root is None:
                try:
                    self._root = self._make_root()
                except Exception as err:
                    self._root_error = f"{type(err).__name__}: {err}"[:500]
                    raise
        return self._root

    def _make_root(self) -> Path:
        if self.a.cifar_root:
            return Path(self.a.cifar_root)
        if self.a.tiny:
            return tiny_cifar(self.tmp / "cifar-tiny")
        return extract(Path(self.a.cifar_tar), self.extract_dir()) / "cifar10-jpg"

    def extract_dir(self) -> Path:
        """``/dev/shm`` when it has room: every part reads the 60,000 files, and a disk
        folder made writing them cost half a minute on a busy machine. Else ``self.tmp``."""
        with contextlib.suppress(OSError):
            if shutil.disk_usage("/dev/shm").free >= SHM_NEEDED:
                self.shm = Path(tempfile.mkdtemp(prefix="gpu-session-", dir="/dev/shm"))
                return self.shm
        return self.tmp

    def prepare_data(self) -> None:
        """The CIFAR copy, made before the first step: outside every part's guard (inside
        the env part's 60 s, extraction could skip it), inside the call's deadline. Its
        seconds are the ``data`` entry of ``session.json``."""
        if any(part != "tests" for part in self.a.parts):
            self.run("data", lambda log: dict(root=str(self.cifar_root())))

    def cleanup(self) -> None:
        for folder in (self.tmp, self.shm):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

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
        call's deadline. A call of this part alone with an explicit ``--deadline`` (the
        extras, a part redone) gives it the whole deadline, even past its usual guard."""
        used = time.monotonic() - self.part_start[part]
        alone = self.a.deadline_given and self.a.parts == [part]
        own = math.inf if alone else GUARDS[part]
        return min(own - used, self.remaining() - 15)

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
    figure file that failed checks of its own keeps that status. A file a kill left half
    written costs its figures, never the part's entry."""
    figures = read_figures(path)
    if run["status"] == "ok" and figures.get("status") not in (None, "ok"):
        run = {**run, "status": figures["status"]}
    return {**figures, **run}


def read_figures(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError) as err:  # truncated by a kill, or unreadable
        return dict(figures_error=f"{path.name}: {type(err).__name__}: {err}"[:500])


# -- the parts ---------------------------------------------------------------------------------
def part_env(s: Session, log: Path) -> dict:
    out = s.tmp / "env.json"
    argv = ["--cifar-root", str(s.cifar_root()), "--json", str(out)]
    return with_figures(s.script(log, "gpu_env", argv, s.guard("env")), out)


def part_tests(s: Session, log: Path) -> dict:
    """The call's GPU tests, then the CPU tests of the GPU data path (``--tests call``), or
    the compile tests alone (``--tests compile``). Each pytest run is verbose, so the tests
    that ended before a guard's kill are in the log and in the part's figures. The tests'
    ``cifar_jpg_root`` fixture gets the copy ``prepare_data`` extracted
    (``SIMCLR_CIFAR10_JPG``), else extracts its own from the carried tarball."""
    if s.a.tiny:
        return dict(status="skipped", error="--tiny")
    if s.guard("tests") < 30:  # as script(): pytest killed at once would read as a timeout
        return dict(status="skipped", error=f"{s.guard('tests'):.0f} s left before the deadline")
    env = {
        "SIMCLR_SHARED_DATA": str(Path(s.a.cifar_tar).parent),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if s._root is not None:  # extracted before the steps
        env["SIMCLR_CIFAR10_JPG"] = str(s._root)
    result = {}
    for key, args in pytest_runs(s.a.tests):
        before = log.stat().st_size if log.exists() else 0
        run = s.process(log, args, s.guard("tests"), env=env)
        result[key] = {**run, **pytest_report(log.read_text()[before:])}
    bad = any(r["status"] != "ok" for r in result.values())
    return {**result, "status": "failed" if bad else "ok", "selection": s.a.tests}


# cold inductor compiles (minutes with max-autotune): a call of their own, --tests compile
COMPILE_TESTS = [
    "tests/test_fast_defaults.py::test_compile_modes_train_on_cuda_and_keep_the_features"
]
CPU_GPU_PATH_TESTS = [
    "tests/data/gpu",
    "tests/data/test_encoded.py",
    "tests/data/test_device_store.py",
]
# seconds one test may take (pytest-timeout, where the image has it): a hung test fails
# alone instead of taking the part's guard with it
TEST_TIMEOUT_S = {"call": 90, "compile": 200}


def pytest_runs(selection: str) -> list[tuple[str, list[str]]]:
    """The pytest commands of the tests part, by key: ``gpu`` and, with ``call``, the CPU
    tests of the GPU data path (``not gpu``: the first run had the GPU-marked ones)."""
    if selection == "compile":  # both at once: one worker each
        return [("gpu_compile", [*pytest_cmd(TEST_TIMEOUT_S["compile"], "load"), *COMPILE_TESTS])]
    base = pytest_cmd(TEST_TIMEOUT_S["call"], "loadfile")
    deselect = [f"--deselect={test}" for test in COMPILE_TESTS]
    return [
        ("gpu", [*base, "-m", "gpu", *deselect, *gpu_test_paths()]),
        ("gpu_data_path_cpu_tests", [*base, "-m", "not slow and not gpu", *CPU_GPU_PATH_TESTS]),
    ]


def pytest_cmd(timeout_s: int, dist: str) -> list[str]:
    """``-v``: a line per test as it ends (the summary a kill never prints is not needed);
    4 xdist workers beside the pair's runs; a timeout per test where pytest-timeout is."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", "4", "--dist", dist]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += [f"--timeout={timeout_s}"]
    return cmd


def gpu_test_paths() -> list[str]:
    """``tests``; without jsonargparse (the CLI's test modules would not import), only the
    files with GPU-marked tests."""
    if importlib.util.find_spec("jsonargparse"):
        return ["tests"]
    return [str(f.relative_to(REPO)) for f in marked_gpu(REPO / "tests")]


def marked_gpu(tests: Path) -> list[Path]:
    return sorted(f for f in tests.rglob("test_*.py") if "pytest.mark.gpu" in f.read_text())


OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# `-v` under xdist: "[gw0] [ 50%] PASSED tests/a.py::test_b", after a line "tests/a.py::test_b"
# when it began; without xdist: "tests/a.py::test_b PASSED  [ 50%]"
ENDED = re.compile(
    rf"^(?:\[gw\d+\] \[\s*\d+%\] ({OUTCOMES}) (.+?)|(\S.*?::.*?) ({OUTCOMES})\b.*)\s*$"
)
BEGAN = re.compile(r"^(\S+\.py::.+?)\s*$")


def pytest_outcomes(text: str) -> tuple[dict[str, str], list[str]]:
    """Each test's outcome (``{node id: "passed"}``) from ``-v`` lines, and the tests that
    began but never ended (the one a kill stopped)."""
    ended: dict[str, str] = {}
    began: list[str] = []
    for line in text.splitlines():
        match = ENDED.match(line)
        if match:
            outcome, test = (match[1], match[2]) if match[1] else (match[4], match[3])
            ended[test] = outcome.lower()
        elif BEGAN.match(line):
            began.append(BEGAN.match(line)[1])
    return ended, [t for t in dict.fromkeys(began) if t not in ended]


def pytest_report(text: str) -> dict:
    """A pytest run's counts (its summary line, else tallied from the tests that ended
    before a kill, with ``incomplete``), the tests that did not pass, and those cut off."""
    ended, unfinished = pytest_outcomes(text)
    counts: dict = pytest_counts(text)
    if not counts:
        counts = {}
        for outcome in ended.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        counts["incomplete"] = True
    not_passed = {test: outcome for test, outcome in ended.items() if outcome != "passed"}
    return {**counts, "not_passed": not_passed, "unfinished": unfinished}


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
    """One time_to_accuracy.py run. Its ``--stop-by`` is the wall-clock time its guard kills
    it (less a margin), counted from before the process starts, so its imports and decode
    are inside it; the run keeps ``KNN_RESERVE_S`` of that for the kNN, and writes its
    figures once trained, so even a kill during the kNN leaves the epochs it trained."""
    out = s.tmp / f"tta-{tag}-{augment}.json"
    argv = ["--root", str(s.cifar_root()), "--augment", augment, "--seed", "0"]
    argv += ["--epochs", str(epochs), "--minutes", str(minutes), "--json", str(out)]
    if s.a.tiny:
        argv += ["--tiny"]
    else:
        stop_by = time.time() + guard - KILL_MARGIN_S
        argv += ["--stop-by", f"{stop_by:.1f}", "--reserve-s", str(KNN_RESERVE_S)]
    return with_figures(s.script(log, "time_to_accuracy", argv, guard), out)


def part_tta_epochs(s: Session, log: Path) -> dict:
    """The GPU and the CPU pipeline side by side (one after the other with ``--tiny``), same
    seed, same ``--epochs``-long schedule: what is compared is their kNN, never their speed.
    Each run's training stops in time for its kNN before its guard (then the epochs are
    unequal, and the summary says so) rather than being killed with no figure."""
    guard = s.guard("tta-epochs")
    train_s = guard - RUN_OVERHEAD_S - KILL_MARGIN_S
    epochs, why = pair_epochs(s, max(train_s, 0))
    if train_s < 30 and not s.a.tiny:
        return dict(status="skipped", error=f"{guard:.0f} s of the call left", epochs=epochs)
    runs: dict[str, dict] = {}

    def one(augment: str) -> None:
        own_log = log.with_name(f"{log.stem}-{augment}.log")
        try:
            runs[augment] = tta(s, own_log, augment, epochs, 0, guard, "epochs")
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
        result["equal_epochs"] = trained_all(cpu, epochs) and trained_all(gpu, epochs)
    bad = any(r.get("status") != "ok" for r in runs.values())
    result["status"] = "failed" if bad else "ok"
    return result


def trained_all(run: dict, epochs: int) -> bool:
    """Whether a run trained every step of its ``epochs``: its ``epochs_done`` is fractional
    (steps / steps per epoch), since Lightning counts an epoch a time limit cut as done."""
    return run.get("steps") == epochs * run.get("steps_per_epoch", math.nan)


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
    need = s.a.budget_minutes * 60 + RUN_OVERHEAD_S + KILL_MARGIN_S
    if guard < need and not s.a.tiny:  # its deadline would cut the budget short
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
            for key in ("gpu", "gpu_compile", "gpu_data_path_cpu_tests"):
                if key in r:
                    lines += tests_lines(key, r[key])
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


def tests_lines(key: str, run: dict) -> list[str]:
    """A pytest run's counts, then each test that did not pass or was cut off by a kill."""
    skip = ("status", "rc", "not_passed", "unfinished")
    counts = {k: v for k, v in run.items() if k not in skip}
    lines = [f"    {key}: {run['status']} {counts}"]
    for test, outcome in (run.get("not_passed") or {}).items():
        lines.append(f"      {outcome}: {test}")
    lines += [f"      unfinished: {test}" for test in run.get("unfinished") or []]
    return lines


def tta_line(run: dict) -> str:
    trained = (
        f"epochs {run['epochs_done']:.2f} of {run['epochs_planned']} ({run['steps']} steps"
        f"{', stopped for its deadline' if run.get('stopped_by_deadline') else ''}) | "
        f"train {run['train_s']:.0f} s ({fmt(run['train_images_per_s'])} img/s) | setup "
        f"{run['setup_s']:.0f} s"
        if "epochs_done" in run
        else ""
    )
    if "knn_top1" not in run:  # a kill during the kNN still leaves the training figures
        head = f"{run.get('status')} {run.get('error') or ''}".strip()
        return " | ".join(filter(None, [head, trained]))
    return f"kNN {run['knn_top1']:.2f}% | {trained}"


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
# (the tool's status says how much) and every part ran to its end: the compiled rows. The
# compile tests (cold inductor compiles, minutes) need a call of their own.
EXTRAS = "--part e2e --e2e-rows model-alone,e2e,compile-default,compile-reduce-overhead"
EXTRAS_DEADLINE = 210
COMPILE_TESTS_CALL = "--part tests --tests compile"
COMPILE_TESTS_DEADLINE = 270


def next_call(results: dict[str, dict], a: argparse.Namespace) -> list[str]:
    """What to run next: the parts this call had no time for (in their steps: ``a+b`` stays
    together), else the extras; the parts that failed are to be fixed here first (their logs
    say what)."""
    status = {part: results.get(part, {}).get("status", "not run") for part in a.parts}
    redo = {
        p
        for p, st in status.items()
        if st in ("skipped", "timeout", "not run") and results.get(p, {}).get("error") != "--tiny"
    }
    broken = [p for p, st in status.items() if st in ("failed", "error")]
    lines = [""]
    if broken:
        logs = ", ".join(f"{p}.log" for p in broken)
        lines.append(f"failed: {', '.join(broken)}: fix on the CPU first ({logs})")
    steps = [[p for p in step if p in redo] for step in a.steps]
    steps = [step for step in steps if step]
    if steps:
        deadline = redo_deadline(steps)
        args = f"--part {','.join('+'.join(step) for step in steps)} --deadline {deadline}"
        if "tests" in redo and a.tests != "call":
            args += f" --tests {a.tests}"
        lines.append(f"next, at once and only with {deadline + 30} s of device time left: {args}")
    else:
        lines.append(
            f"next, at once and only with {EXTRAS_DEADLINE + 30} s of device time left "
            f"(optional): {EXTRAS} --deadline {EXTRAS_DEADLINE}; else give the machine back"
        )
        lines.append(
            f"the compile tests need a call of their own ({COMPILE_TESTS_DEADLINE + 30} s): "
            f"{COMPILE_TESTS_CALL} --deadline {COMPILE_TESTS_DEADLINE}"
        )
    return lines


def redo_deadline(steps: list[list[str]]) -> int:
    """A call's deadline for these steps: each step's longest guard, the extraction and the
    deadline's 15 s margin, never more than ``MAX_DEADLINE`` (its timeout_s, the deadline +
    30, must stay within the 570 s the runbook gives a call)."""
    data = EXTRACT_S if any(p != "tests" for step in steps for p in step) else 0
    need = sum(max(GUARDS[p] for p in step) for step in steps) + data + 15
    return min(need, MAX_DEADLINE)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.tiny:  # on a shared small CPU, OpenMP threads spin-waiting for each other cost 10x
        import torch

        torch.set_num_threads(1)
    s = Session(a)
    try:
        s.prepare_data()
        for step in a.steps:
            s.run_step(step)
    finally:
        s.cleanup()
    print(f"\n== gpu_session: {a.part} | logs and figures in {a.out} ==")
    print("\n".join(summary_lines(s.results) + next_call(s.results, a)))
    return s.results


if __name__ == "__main__":
    main()
