"""End-to-end training throughput through ``lightning.Trainer.fit``, against the model alone.

    python benchmarks/e2e_throughput.py --root cifar10-jpg          # full sizes, GPU present
    python benchmarks/e2e_throughput.py --root cifar10-jpg --rows model-alone,e2e,compile-default
    python benchmarks/e2e_throughput.py --tiny                      # seconds on a CPU

``throughput.py`` times a hand-written step; users run ``Trainer.fit``, with its loop, the
data module's batch hooks, the callbacks and the logger. This script times that product path,
SimCLR ResNet-18 with the CIFAR stem (``configs/cifar10.yaml``'s model) on the image-folder
data module as ``configs/cifar10_jpg_gpu.yaml`` sets it (``augment: gpu, resident: true``),
with ``OnlineLinearProbe`` and a ``CSVLogger`` (``log_every_n_steps`` 50), rows side by side in
one process. Images/s are measured over ``--steps`` steps after ``--warmup`` by CUDA events
(host clock on a CPU) at the two ends of the window only, so the timing adds no host sync.
Every row is also given as a ratio of "model alone": the same module in the same Trainer on
view batches already on the device (no loading, no augmentation, no callbacks, no logger).
Validation is off in every row (it is not training throughput).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import make_step  # noqa: E402

from simclr_lightning import ImageFolderDataModule, OnlineLinearProbe, SimCLR  # noqa: E402
from simclr_lightning.data.device_store import IndexDataset  # noqa: E402
from simclr_lightning.data.transforms import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    SimCLRAugmentation,
)

# configs/cifar10_jpg_gpu.yaml's views
CIFAR_VIEWS = SimCLRAugmentation(
    image_size=32, jitter_strength=0.5, blur_prob=0.0, mean=CIFAR10_MEAN, std=CIFAR10_STD
)
ROWS = (
    "hand-step",
    "model-alone",
    "e2e",
    "e2e-bar",
    "e2e-bar1",
    "e2e-sync",
    "e2e-sgd",
    "e2e-lars-loop",
    "cpu-pipeline",
    "compile-default",
    "compile-reduce-overhead",
)
# rows that may be asked for but are not run by default: autotuning compiles for minutes
EXTRA_ROWS = ("compile-max-autotune", "compile-max-autotune-no-cudagraphs")
COMPILE_ROWS = ("compile-default", "compile-reduce-overhead", *EXTRA_ROWS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="CIFAR-10 ImageFolder (tiny: the package sample)")
    p.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS + EXTRA_ROWS)}"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 512 (tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, default 30 (tiny 0)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, default 200 (tiny 1)")
    p.add_argument("--workers", type=int, default=None, help="CPU pipeline, default 16 (tiny 0)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--log-dir", default=None, help="CSVLogger folder (default: a temp folder)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: code paths only")
    a = p.parse_args(argv)
    a.rows = [r for r in a.rows.split(",") if r]
    unknown = sorted(set(a.rows) - set(ROWS + EXTRA_ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS + EXTRA_ROWS)}")
    for name, (small, full) in dict(batch_size=(2, 512), warmup=(0, 30), steps=(1, 200)).items():
        if getattr(a, name) is None:
            setattr(a, name, small if a.tiny else full)
    if a.workers is None:
        a.workers = 0 if a.tiny else 16
    a.cuda = torch.cuda.is_available() and not a.tiny
    return a


# -- timing ------------------------------------------------------------------------------------
class StepWindow(L.Callback):
    """Times the ``steps`` training steps after ``warmup`` and then stops the fit.

    On CUDA two events on the current stream bracket the window, so nothing waits on the
    device inside it; the host clock (synchronized once at each end) is kept as a check."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.seen = 0
        self.images = 0
        self.events: tuple | None = None
        self.wall: list[float] = []

    def mark(self, device: torch.device) -> None:
        """One end of the window."""
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events = (self.events or ()) + (event,)
            torch.cuda.synchronize(device)
        self.wall.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.warmup == 0 and not self.wall:  # no warm-up: from the first step's start
            self.mark(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.warmup:
            self.mark(pl_module.device)
        elif self.seen > self.warmup:
            self.images += len(batch[1])  # ((view_a, view_b), labels): labels count images
            if self.seen == self.warmup + self.steps:
                self.mark(pl_module.device)
                trainer.should_stop = True

    def result(self) -> dict:
        """Images/s (events on CUDA, else host clock), timed steps, seconds."""
        if len(self.wall) != 2:
            raise RuntimeError(f"the fit stopped after {self.seen} steps, before the window ended")
        wall_s = self.wall[1] - self.wall[0]
        seconds = self.events[0].elapsed_time(self.events[1]) / 1000 if self.events else wall_s
        return dict(
            images_per_s=self.images / seconds,
            wall_images_per_s=self.images / wall_s,
            steps=self.seen - self.warmup,
            seconds=seconds,
        )


class LARSLoop(L.Callback):
    """LARS's per-parameter loop instead of its multi-tensor step (the default on CUDA)."""

    def on_train_start(self, trainer, pl_module) -> None:
        for group in trainer.optimizers[0].param_groups:
            group["foreach"] = False


class SyncEveryStep(L.Callback):
    """What a host sync per step costs (the old ``isfinite``/``.tolist()`` checks did one)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


# -- data --------------------------------------------------------------------------------------
class ViewsOnDevice(L.LightningDataModule):
    """One random pair of view batches (never zeros), made once on the training device and
    served at every step: the model alone, without loading or augmentation."""

    def __init__(self, batch_size: int, steps: int) -> None:
        super().__init__()
        self.batch_size, self.steps = batch_size, steps
        self.batch = None

    def _views(self, _indices):
        if self.batch is None:
            device = self.trainer.strategy.root_device
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(2, self.batch_size, 3, 32, 32, device=device, generator=gen)
            labels = torch.randint(0, 10, (self.batch_size,), device=device, generator=gen)
            self.batch = ((x[0], x[1]), labels)
        return self.batch

    def train_dataloader(self) -> DataLoader:
        indices = IndexDataset(self.steps * self.batch_size)
        return DataLoader(indices, batch_size=self.batch_size, collate_fn=self._views)


def folder_module(a: argparse.Namespace, augment: str) -> ImageFolderDataModule:
    gpu = augment == "gpu"
    return ImageFolderDataModule(
        root=str(a.root),
        augmentation=CIFAR_VIEWS,
        batch_size=a.batch_size,
        augment=augment,
        resident=gpu,
        num_workers=a.workers,  # gpu: the workers decode the resident copy once, at setup
        persistent_workers=a.workers > 0,
    )


# -- models ------------------------------------------------------------------------------------
def simclr(optimizer: str = "lars", compile_mode: str | None = None) -> tuple[SimCLR, str]:
    """``configs/cifar10.yaml``'s model; ``compile_mode`` through ``SimCLR(compile_mode=...)``
    where the module has it, else by compiling the encoder here (the note says which)."""
    kwargs = dict(backbone="resnet18", cifar_stem=True, optimizer=optimizer)
    if optimizer == "sgd":
        kwargs.update(base_lr=0.12, weight_decay=5e-4, loss_reduction="mean")
    if compile_mode is None:
        return SimCLR(**kwargs), ""
    if "compile_mode" in inspect.signature(SimCLR.__init__).parameters:
        return SimCLR(compile=True, compile_mode=compile_mode, **kwargs), ""
    model = SimCLR(**kwargs)
    model.backbone.compile(mode=None if compile_mode == "default" else compile_mode)
    return model, "emulated: SimCLR has no compile_mode yet, backbone.compile(mode=...)"


@dataclass
class Row:
    key: str
    name: str
    images_per_s: float | None = None
    wall_images_per_s: float | None = None
    steps: int | None = None
    seconds: float | None = None
    peak_gib: float | None = None
    ratio: float | None = None
    note: str = ""
    error: str | None = None


def fit_row(
    a, row: Row, model: SimCLR, data, callbacks: list, logger: bool, bar: bool | int
) -> None:
    """One ``Trainer.fit`` of ``warmup + steps`` steps, timed by :class:`StepWindow`."""
    window = StepWindow(a.warmup, a.steps)
    if bar:  # True: every 50 steps; a number: every that many (Lightning's default is 1)
        callbacks = [*callbacks, TQDMProgressBar(refresh_rate=50 if bar is True else bar)]
    trainer = L.Trainer(
        accelerator="gpu" if a.cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if a.cuda else "32-true",
        benchmark=a.cuda,
        max_steps=a.warmup + a.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=CSVLogger(a.log_dir, name=row.key) if logger else False,
        log_every_n_steps=50,
        enable_progress_bar=bar,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[*callbacks, window],
    )
    if a.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=data)
    for k, v in window.result().items():
        setattr(row, k, v)
    if a.cuda:
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30


def hand_step_row(a, row: Row) -> None:
    """``throughput.py``'s step (SGD, bf16 autocast, channels-last) with no Trainer at all."""
    device = torch.device("cuda" if a.cuda else "cpu")
    step = make_step(SimCLR(backbone="resnet18", cifar_stem=True), device)
    gen = torch.Generator(device=device).manual_seed(0)
    views = torch.randn(2, a.batch_size, 3, 32, 32, device=device, generator=gen)
    for _ in range(a.warmup):
        step(views[0], views[1])
    clock = StepWindow(0, a.steps)
    clock.mark(device)
    for _ in range(a.steps):
        step(views[0], views[1])
    clock.images, clock.seen = a.steps * a.batch_size, a.steps
    clock.mark(device)
    for k, v in clock.result().items():
        setattr(row, k, v)


def run_rows(a: argparse.Namespace) -> list[Row]:
    """Every row of ``a.rows``; the figures file is rewritten after each, so a run stopped by
    a time guard keeps the rows it finished."""
    rows: list[Row] = []
    gpu_data = cpu_data = None
    for key in a.rows:
        if a.tiny and key in COMPILE_ROWS:  # minutes of compiling on a CPU
            rows.append(Row(key, key, note="skipped with --tiny"))
            continue
        L.seed_everything(0, verbose=False)
        row = Row(key, key)
        try:
            if key == "hand-step":
                row.name = "hand-written step (throughput.py), views on device"
                hand_step_row(a, row)
            elif key == "model-alone":
                row.name = "model alone: Trainer, views on device"
                data = ViewsOnDevice(a.batch_size, a.warmup + a.steps + 1)
                fit_row(a, row, simclr()[0], data, [], logger=False, bar=False)
            elif key == "cpu-pipeline":
                row.name = f"e2e: CPU pipeline, {a.workers} workers"
                cpu_data = cpu_data or folder_module(a, "cpu")
                fit_row(a, row, simclr()[0], cpu_data, [OnlineLinearProbe()], True, False)
            else:
                gpu_data = gpu_data or folder_module(a, "gpu")
                callbacks: list = [OnlineLinearProbe()]
                optimizer, mode, bar = "lars", None, False
                if key == "e2e":
                    row.name = "e2e: GPU pipeline, resident (eager)"
                elif key == "e2e-bar":
                    row.name, bar = "e2e: same, progress bar every 50 steps", True
                elif key == "e2e-bar1":  # its postfix reads the logged loss: a host sync
                    row.name, bar = "e2e: same, progress bar every step (Lightning's default)", 1
                elif key == "e2e-sync":
                    row.name = "e2e: same + cuda.synchronize() every step"
                    callbacks.append(SyncEveryStep())
                elif key == "e2e-sgd":
                    row.name, optimizer = "e2e: same, SGD instead of LARS", "sgd"
                elif key == "e2e-lars-loop":
                    row.name = "e2e: same, LARS one parameter at a time (foreach=False)"
                    callbacks.append(LARSLoop())
                else:
                    mode = key.removeprefix("compile-")
                    row.name = f"e2e: same, compiled ({mode})"
                model, row.note = simclr(optimizer, mode)
                fit_row(a, row, model, gpu_data, callbacks, logger=True, bar=bar)
        except Exception as err:  # one failing row must not lose the others' figures
            row.error = f"{type(err).__name__}: {err}"[:2000]
        rows.append(row)
        alone = next((r.images_per_s for r in rows if r.key == "model-alone"), None)
        for done in rows:
            done.ratio = done.images_per_s / alone if alone and done.images_per_s else None
        write_json(a, rows)
        if a.cuda:
            torch.cuda.empty_cache()
    return rows


def device_name(cuda: bool) -> str:
    return torch.cuda.get_device_name() if cuda else "CPU"


def print_table(a: argparse.Namespace, rows: list[Row]) -> None:
    print(
        f"device: {device_name(a.cuda)}; torch {torch.__version__}; lightning {L.__version__}; "
        f"batch {a.batch_size}; {a.steps} timed steps after {a.warmup}"
    )
    width = max(len(r.name) for r in rows)
    print(f"\n{'row':<{width}}  {'images/s':>10}  {'x alone':>7}  {'peak GiB':>8}")
    for r in rows:
        if r.images_per_s is None:
            print(f"{r.name:<{width}}  {r.error or r.note}")
            continue
        ratio = f"{r.ratio:7.2f}" if r.ratio is not None else f"{'-':>7}"
        peak = f"{r.peak_gib:8.2f}" if r.peak_gib is not None else f"{'-':>8}"
        note = f"  ({r.note})" if r.note else ""
        print(f"{r.name:<{width}}  {r.images_per_s:10.1f}  {ratio}  {peak}{note}")


def main(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    torch.backends.cudnn.benchmark = True
    if a.tiny:  # on a shared small CPU, OpenMP threads spin-waiting for each other cost 10x
        torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        if a.root is None:
            if not a.tiny:
                raise SystemExit("--root is needed at full size (the CIFAR-10 JPEG copy)")
            from simclr_lightning import sample_root

            a.root = sample_root()
        if a.log_dir is None:
            a.log_dir = stack.enter_context(tempfile.TemporaryDirectory())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|warmup_epochs|bottleneck)")
            rows = run_rows(a)
    print_table(a, rows)
    return rows


def write_json(a: argparse.Namespace, rows: list[Row]) -> None:
    if a.json:
        figures = dict(
            part="e2e",
            device=device_name(a.cuda),
            torch=torch.__version__,
            lightning=L.__version__,
            cpu_cores=os.cpu_count(),
            batch_size=a.batch_size,
            warmup=a.warmup,
            steps=a.steps,
            rows=[asdict(r) for r in rows],
        )
        # atomically: the session's time guard may kill this run mid-write, and a half-written
        # file would cost the rows already measured
        tmp = Path(a.json).with_name(f".{Path(a.json).name}.tmp")
        tmp.write_text(json.dumps(figures, indent=1))
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
