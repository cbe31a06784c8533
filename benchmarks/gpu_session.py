"""Issue 11's measurements on a lent GPU, in parts that each fit a device call.

    python benchmarks/gpu_session.py --part env,tests,throughput       # call 1
    python benchmarks/gpu_session.py --part e2e                        # call 2
    python benchmarks/gpu_session.py --part tta-epochs,tta-budget      # call 3
    python benchmarks/gpu_session.py --tiny                            # every part, CPU, seconds

A device call lasts at most 10 minutes and a session has about 30 minutes of device time, so
nothing may be improvised there: ``benchmarks/README.md`` ("GPU session runbook") gives the
three calls. Each part runs in its own process under its own time guard, cut further so the
whole call ends by ``--deadline`` seconds; it writes ``<part>.log`` (everything it printed)
and ``<part>.json`` (its figures, its status, its seconds) under ``--out`` (default ``$OUT``).
The summary table, and the issue's targets against the figures of this call, print last.

Parts: ``env`` (``gpu_env.py``: versions, nvidia-smi, every import, first contact of nvJPEG,
GPUAugment and a bf16 channels-last step), ``tests`` (``pytest -m gpu``,
then the CPU tests of the GPU data path), ``throughput`` (``throughput.py`` at full size, eager
and compiled), ``e2e`` (``e2e_throughput.py``), ``tta-epochs`` (``time_to_accuracy.py``, GPU
then CPU pipeline, same seed and schedule, ``--epochs`` each) and ``tta-budget`` (the GPU
pipeline for ``--budget-minutes``; its schedule's epochs are what the tta-epochs GPU run's
speed fits in the budget when it ran in the same call, as a user would choose them).

``--tiny`` runs every part's code path at tiny sizes on the CPU, in this process (no guards),
on a few images of the packaged CIFAR-10 sample; ``tests`` is skipped there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("env", "tests", "throughput", "e2e", "tta-epochs", "tta-budget")
# seconds each part may take at full size (a call's --deadline cuts them further)
GUARDS = {
    "env": 120,
    "tests": 180,
    "throughput": 360,
    "e2e": 420,
    "tta-epochs": 480,
    "tta-budget": 300,
}
# a time_to_accuracy.py run outside training (start, resident decode, kNN) as planned for,
# and the slack its guard allows beyond that before the run is killed
RUN_OVERHEAD_S, RUN_SLACK_S = 45, 120
CPU_RUN_S = 130  # what --epochs should cost the CPU pipeline (see suggest_epochs)
CIFAR_EPOCH = 49_664  # CIFAR-10's 50,000 training images in full batches of 512
TARGETS = dict(e2e_images_per_s=18_000, e2e_ratio=0.90, r50_nvjpeg=1_700, knn_gap=0.5, knn=75.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-session-out")
    p.add_argument("--cifar-tar", default=str(REPO / ".gpu-data" / "cifar10-jpg.tar.gz"))
    p.add_argument("--cifar-root", default=None, help="an extracted copy (else: the tarball's)")
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole call")
    p.add_argument("--epochs", type=int, default=15, help="tta-epochs: epochs of each run")
    p.add_argument("--gpu-minutes", type=float, default=2.0, help="tta-epochs: GPU run's cap")
    p.add_argument("--cpu-minutes", type=float, default=3.5, help="tta-epochs: CPU run's cap")
    p.add_argument("--budget-minutes", type=float, default=3.0)
    p.add_argument("--budget-epochs", type=int, default=None, help="default: see the docstring")
    p.add_argument("--e2e-rows", default=None, help="e2e_throughput.py --rows")
    p.add_argument("--tiny", action="store_true", help="CPU dry run of every part, in-process")
    a = p.parse_args(argv)
    a.parts = [x for x in a.part.split(",") if x]
    unknown = sorted(set(a.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
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
        self.part_start = self.start

    def remaining(self) -> float:
        return self.a.deadline - (time.monotonic() - self.start)

    def cifar_root(self) -> Path:
        """The CIFAR-10 JPEG folder: given, extracted from the carried tarball once, or (tiny)
        4 training and 2 validation images per class of the packaged sample."""
        if self._root is None:
            if self.a.cifar_root:
                self._root = Path(self.a.cifar_root)
            elif self.a.tiny:
                self._root = tiny_cifar(self.tmp / "cifar-tiny")
            else:
                tar = Path(self.a.cifar_tar)
                if not tar.is_file():
                    raise FileNotFoundError(f"{tar} is missing: run benchmarks/gpu_prepare.sh")
                with tarfile.open(tar) as archive:
                    archive.extractall(self.tmp, filter="data")
                self._root = self.tmp / "cifar10-jpg"
        return self._root

    def run(self, part: str, body: Callable[[Path], dict]) -> dict:
        """Run ``body(log)`` for ``part`` and write its figures to ``<part>.json``."""
        log = self.a.out / f"{part}.log"
        began = self.part_start = time.monotonic()
        try:
            result = body(log)
        except Exception as err:  # a part's failure must not cost the others
            result = dict(status="error", error=f"{type(err).__name__}: {err}"[:2000])
        result = {**result, "part": part}
        result.setdefault("status", "ok")
        result["seconds"] = round(time.monotonic() - began, 1)
        (self.a.out / f"{part}.json").write_text(json.dumps(result, indent=1, default=str))
        self.results[part] = result
        return result

    def guard(self, part: str) -> float:
        """The seconds ``part`` may still take: what is left of its own guard, cut by the
        call's deadline."""
        return min(GUARDS[part] - (time.monotonic() - self.part_start), self.remaining() - 15)

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
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}  (guard {guard:.0f} s)\n")
            out.flush()
            environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
            try:
                proc = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=environ, timeout=guard
                )
            except subprocess.TimeoutExpired:
                out.write(f"\n[gpu_session] killed after its guard of {guard:.0f} s\n")
                return dict(status="timeout", rc=None)
        return dict(status="ok" if proc.returncode == 0 else "failed", rc=proc.returncode)

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
    env = {  # the tests' cifar_jpg_root fixture reads the carried tarball
        "SIMCLR_SHARED_DATA": str(Path(s.a.cifar_tar).parent),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    pytest = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
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
    out = s.tmp / "throughput.json"
    argv = ["--cifar-root", str(s.cifar_root()), "--json", str(out)]
    if s.a.tiny:
        argv += ["--tiny", "--steps", "1", "--warmup", "0", "--cifar-batch", "2"]
        argv += ["--imagenet-batch", "2", "--imagenet-size", "32", "--jpegs", "4"]
        argv += ["--workers", "0"]
    else:
        argv += ["--compile"]
    return with_figures(s.script(log, "throughput", argv, s.guard("throughput")), out)


def part_e2e(s: Session, log: Path) -> dict:
    out = s.tmp / "e2e.json"
    argv = ["--root", str(s.cifar_root()), "--json", str(out)]
    argv += ["--tiny"] if s.a.tiny else []
    argv += ["--rows", s.a.e2e_rows] if s.a.e2e_rows else []
    return with_figures(s.script(log, "e2e_throughput", argv, s.guard("e2e")), out)


def tta(s: Session, log: Path, augment: str, epochs: int, minutes: float, guard: float) -> dict:
    out = s.tmp / f"tta-{augment}-{epochs}-{minutes}.json"
    argv = ["--root", str(s.cifar_root()), "--augment", augment, "--seed", "0"]
    argv += ["--epochs", str(epochs), "--minutes", str(minutes), "--json", str(out)]
    argv += ["--tiny"] if s.a.tiny else []
    return with_figures(s.script(log, "time_to_accuracy", argv, guard), out)


def part_tta_epochs(s: Session, log: Path) -> dict:
    """GPU then CPU pipeline, same seed, same ``--epochs``-long schedule. Each run's training
    stops at its ``--minutes`` (then the epochs are unequal, and the summary says so); the CPU
    run's minutes shrink to what the call has left once tta-budget's share is kept for it."""
    epochs, runs = s.a.epochs, {}
    guard = min(s.a.gpu_minutes * 60 + RUN_SLACK_S, s.guard("tta-epochs"))
    runs["gpu"] = tta(s, log, "gpu", epochs, s.a.gpu_minutes, guard)
    reserve = s.a.budget_minutes * 60 + RUN_OVERHEAD_S if "tta-budget" in s.a.parts else 0
    minutes = min(s.a.cpu_minutes, (s.remaining() - 15 - reserve - RUN_OVERHEAD_S) / 60)
    if minutes < 0.5:
        runs["cpu"] = dict(status="skipped", error=f"{minutes:.1f} min of the call left")
    else:
        guard = min(minutes * 60 + RUN_SLACK_S, s.guard("tta-epochs"))
        runs["cpu"] = tta(s, log, "cpu", epochs, round(minutes, 2), guard)
    cpu, gpu = runs["cpu"], runs["gpu"]
    result: dict = dict(epochs=epochs, cpu=cpu, gpu=gpu)
    if "knn_top1" in cpu and "knn_top1" in gpu:
        result["knn_gap"] = gpu["knn_top1"] - cpu["knn_top1"]
        result["equal_epochs"] = cpu["epochs_done"] == gpu["epochs_done"] == epochs
    bad = any(r.get("status") != "ok" for r in runs.values())
    result["status"] = "failed" if bad else "ok"
    return result


def suggest_epochs(throughput: dict) -> tuple[int, float] | None:
    """tta-epochs' ``--epochs``: as many (8 to 20) as the CPU pipeline, at the speed
    throughput.py measured for it, trains in ``CPU_RUN_S`` seconds, so both runs, and
    tta-budget after them, fit one call."""
    for row in throughput.get("rows", []):
        name, rate = row["name"], row.get("images_per_s")
        if name.startswith("CIFAR R18: CPU pipeline") and name.endswith("(eager)") and rate:
            return max(8, min(20, math.floor(CPU_RUN_S * rate / CIFAR_EPOCH))), rate
    return None


def budget_epochs(s: Session) -> tuple[int, str]:
    """The schedule's length for the budget run: given; else what the GPU pipeline's speed in
    this call's tta-epochs run fits in the budget; else time_to_accuracy.py's default."""
    if s.a.budget_epochs:
        return s.a.budget_epochs, "--budget-epochs"
    rate = s.results.get("tta-epochs", {}).get("gpu", {}).get("train_images_per_s")
    if rate and not s.a.tiny:
        epochs = max(1, math.floor(s.a.budget_minutes * 60 * rate / CIFAR_EPOCH))
        return epochs, f"fits the budget at the tta-epochs GPU run's {rate:.0f} images/s"
    return 65, "time_to_accuracy.py's default (about 18k images/s for 3 minutes)"


def part_tta_budget(s: Session, log: Path) -> dict:
    epochs, why = budget_epochs(s)
    guard = s.guard("tta-budget")
    if guard < s.a.budget_minutes * 60 + 45 and not s.a.tiny:  # it would be killed mid-run
        return dict(status="skipped", error=f"{guard:.0f} s of the call left")
    run = tta(s, log, "gpu", epochs, s.a.budget_minutes, guard)
    return {**run, "schedule_epochs": epochs, "schedule_epochs_why": why}


PART_BODIES = {
    "env": part_env,
    "tests": part_tests,
    "throughput": part_throughput,
    "e2e": part_e2e,
    "tta-epochs": part_tta_epochs,
    "tta-budget": part_tta_budget,
}


# -- the summary -------------------------------------------------------------------------------
def fmt(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def summary_lines(results: dict[str, dict]) -> list[str]:
    """One block per part, then the issue's targets met or missed by this call's figures."""
    lines, targets = [], []
    for part, r in results.items():
        head = f"{part:<11} {r['status']:<8} {r['seconds']:>6.0f} s"
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
    suggestion = suggest_epochs(results.get("throughput", {}))
    if suggestion:
        epochs, rate = suggestion
        lines += [
            "",
            f"next: call 3 with --epochs {epochs} (the CPU pipeline's {rate:,.0f} images/s "
            f"train {epochs} epochs in about {epochs * CIFAR_EPOCH / rate:.0f} s)",
        ]
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


def main(argv: list[str] | None = None) -> dict[str, dict]:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.tiny:  # on a shared small CPU, OpenMP threads spin-waiting for each other cost 10x
        import torch

        torch.set_num_threads(1)
    s = Session(a)
    try:
        for part in a.parts:
            s.run(part, lambda log, part=part: PART_BODIES[part](s, log))
    finally:
        shutil.rmtree(s.tmp, ignore_errors=True)
    print(f"\n== gpu_session: {', '.join(a.parts)} | logs and figures in {a.out} ==")
    print("\n".join(summary_lines(s.results)))
    return s.results


if __name__ == "__main__":
    main()
