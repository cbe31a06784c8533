"""Peak memory and time of NT-Xent's forward + backward, tiled against untiled, in one run.

    python benchmarks/loss_memory.py                     # N = 4096 ... 32768, one thread
    python benchmarks/loss_memory.py --tiny              # seconds: every row, tiny sizes

Embeddings are [N, 128] per view (2N in all), one process. Rows:

* ``tiled + stats``: ``NTXentLoss.forward_with_stats``, what ``SimCLR.training_step`` runs;
* ``tiled``: ``NTXentLoss.forward``, the loss alone;
* ``untiled``: the plain formulation (the whole [2N, 2N] matrix, ``cross_entropy``);
* ``untiled + stats``: the same with the collapse statistics computed on the full matrix,
  as the training path did before tiled NT-Xent;
* ``lightly``: lightly's ``NTXentLoss``, when lightly is installed.

Each configuration runs in a fresh subprocess (``--tiny``, a smoke run of the code paths: all
in this one process). Memory is the process's peak resident set above its resident set just
before the loss (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS``): torch's CPU allocations are not visible to
tracemalloc. A configuration whose estimated peak is above ``--max-gib`` is not run.
Then the loss memory of a global batch of 4k to 64k on one GPU is estimated from these
measurements (estimates, not measured on a GPU).

``--grad-cache`` prints a second table instead: peak memory and time of one real training
step (Lightning, SGD, CIFAR ResNet-18 at 32 px, ``--step-batch`` image pairs) with
``SimCLR(grad_cache_chunks=k)`` for several k, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_lightning import NTXentLoss  # noqa: E402

GIB = 2**30
TEMPERATURE = 0.5
ROWS = ("tiled + stats", "tiled", "untiled", "untiled + stats", "lightly")
# float32 copies of the [2N, 2N] matrix each untiled row holds at its peak (measured here,
# rounded up): only used to skip what would not fit under --max-gib.
UNTILED_COPIES = {"untiled": 3.2, "untiled + stats": 9.5, "lightly": 4.5}
ISOLATION = {False: "fresh process", True: "one process (--tiny)"}


def untiled_loss(z_a: torch.Tensor, z_b: torch.Tensor, with_stats: bool):
    """NT-Xent on the whole similarity matrix at once (the code before tiled NT-Xent)."""
    n = len(z_a)
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    cos = z @ z.T
    idx = torch.arange(2 * n)
    pos_idx = (idx + n) % (2 * n)
    logits = cos / TEMPERATURE
    logits[idx, idx] = float("-inf")
    loss = F.cross_entropy(logits, pos_idx)
    if with_stats:
        with torch.no_grad():
            cos = cos.detach()
            pos = cos[idx, pos_idx]
            neg_mask = torch.ones_like(cos, dtype=torch.bool)
            neg_mask[idx, idx] = False
            neg_mask[idx, pos_idx] = False
            scored = cos.masked_fill(~neg_mask, float("-inf"))
            scored[idx, pos_idx] = pos
            _ = (pos.mean(), cos[neg_mask].mean(), (scored.argmax(1) == pos_idx).float().mean())
    return loss


def make_loss(row: str, block_size: int):
    if row == "lightly":
        from lightly.loss import NTXentLoss as LightlyNTXent

        return LightlyNTXent(temperature=TEMPERATURE)
    if row.startswith("untiled"):
        return lambda a, b: untiled_loss(a, b, with_stats=row.endswith("stats"))
    ours = NTXentLoss(TEMPERATURE, gather_distributed=False, block_size=block_size)
    if row == "tiled + stats":
        return lambda a, b: ours.forward_with_stats(a, b)[0]
    return ours


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def worker(row: str, n: int, dim: int, threads: int, block_size: int) -> dict:
    """One forward + backward in this (fresh) process: peak memory above the baseline, time."""
    torch.set_num_threads(threads)
    loss_fn = make_loss(row, block_size)
    small = [torch.randn(8, dim, requires_grad=True) for _ in range(2)]
    loss_fn(*small).backward()  # load kernels and lazy state outside the measurement
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(n, dim, generator=gen).requires_grad_()
    z_b = torch.randn(n, dim, generator=gen).requires_grad_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = loss_fn(z_a, z_b)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"peak_gib": (peak - base) * 1024 / GIB, "seconds": seconds, "loss": float(loss)}


def step_worker(chunks: int, pairs: int, size: int, threads: int) -> dict:
    """One SimCLR training step through Lightning: peak memory above the baseline, time."""
    import lightning as L
    from torch.utils.data import DataLoader

    from simclr_lightning import SimCLR

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2, pairs, 3, size, size, generator=gen)
    loader = DataLoader([((views[0, i], views[1, i]), 0) for i in range(pairs)], batch_size=pairs)
    model = SimCLR(cifar_stem=True, optimizer="sgd", warmup_epochs=0, grad_cache_chunks=chunks)
    times = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args):
            times.append(time.perf_counter())

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    )
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    trainer.fit(model, loader)
    peak = _status_kib("VmHWM")
    return {"peak_gib": (peak - base) * 1024 / GIB, "seconds": times[1] - times[0]}


def grad_cache_table(args: argparse.Namespace) -> None:
    size = 16 if args.tiny else 32
    print(
        f"device: CPU ({args.threads} thread(s)), torch {torch.__version__}; one SimCLR "
        f"training step, CIFAR ResNet-18 at {size} px, {args.step_batch} image pairs per "
        f"device; peak RSS above the baseline (VmHWM - VmRSS), {ISOLATION[args.tiny]} per row"
    )
    print(f"{'grad_cache_chunks':>17} | {'peak memory':>12} | {'step time':>9} | vs 1 chunk")
    first = None
    for chunks in args.chunks:
        if args.tiny:
            r = step_worker(chunks, args.step_batch, size, args.threads)
        else:
            cmd = [sys.executable, __file__, "--step-worker", str(chunks), str(args.step_batch)]
            cmd += [str(size), str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{chunks:>17} | failed: {proc.stderr.strip().splitlines()[-1][:60]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        first = first or r
        ratio = f"memory {r['peak_gib'] / first['peak_gib']:.3f}x, "
        ratio += f"time {r['seconds'] / first['seconds']:.2f}x"
        print(f"{chunks:>17} | {r['peak_gib']:>8.4g} GiB | {r['seconds']:>7.3g} s | {ratio}")


def one_process_measurements() -> None:
    """``--tiny`` measures every cell in this process: a fixed glibc mmap threshold (64 KiB)
    hands blocks above it back to the system when freed, so a cell's peak is its own page
    faults rather than heap an earlier cell left behind."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def measure(row: str, n: int, args: argparse.Namespace) -> dict | str:
    if row == "lightly":
        try:
            import lightly  # noqa: F401
        except ImportError:
            return "not installed"
    if row in UNTILED_COPIES:
        estimate = UNTILED_COPIES[row] * (2 * n) ** 2 * 4 / GIB
        if estimate > args.max_gib:
            return f"skipped: ~{estimate:.0f} GiB > --max-gib"
    if args.tiny:
        return worker(row, n, args.dim, args.threads, args.block_size)
    cmd = [sys.executable, __file__, "--worker", row, str(n), str(args.dim), str(args.threads)]
    cmd += ["--block-size", str(args.block_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1][:60]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(result: dict | str) -> str:
    if isinstance(result, str):
        return result
    return f"{result['peak_gib']:.4g} GiB, {result['seconds']:.3g} s"


def gpu_estimates(table: dict, dim: int) -> list[str]:
    """Loss memory of a global batch on one GPU, scaled from the largest N measured here:
    linearly for the tiled loss (its peak is embeddings plus one tile of fixed height),
    quadratically for the untiled ones (their peak is copies of the 2N x 2N matrix)."""
    largest = {}
    for row in ("tiled + stats", "untiled", "untiled + stats"):
        done = [(n, r["peak_gib"]) for n, r in table.get(row, []) if isinstance(r, dict)]
        if done:
            largest[row] = done[-1]
    if "tiled + stats" not in largest:
        return []
    lines = ["", f"estimated loss memory on one GPU (scaled from the CPU rows above; D={dim}):"]
    lines.append(f"{'global batch':>14} | " + " | ".join(f"{row:>15}" for row in largest))
    for batch in (4096, 8192, 16384, 32768, 65536):
        cells = []
        for row, (n, peak) in largest.items():
            power = 1 if row.startswith("tiled") else 2
            cells.append(f"{peak * (batch / n) ** power:>11.2f} GiB")
        lines.append(f"{batch:>14,} | " + " | ".join(cells))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block-size", type=int, default=1024, help="NTXentLoss(block_size=...)")
    p.add_argument("--max-gib", type=float, default=12.0, help="skip untiled rows above this")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--grad-cache", action="store_true", help="the training-step table")
    p.add_argument("--step-batch", type=int, default=None, help="image pairs per step")
    p.add_argument("--chunks", type=int, nargs="+", default=None, help="grad_cache_chunks")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--worker", nargs=4, metavar=("ROW", "N", "DIM", "THREADS"), help="internal")
    p.add_argument("--step-worker", nargs=4, type=int, help="internal")
    a = p.parse_args(argv)
    if a.tiny:
        a.sizes, a.block_size = [256, 1024], 128
    a.step_batch = a.step_batch or (8 if a.tiny else 256)
    a.chunks = a.chunks or ([1, 2] if a.tiny else [1, 4, 16])
    return a


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        row, n, dim, threads = args.worker
        print(json.dumps(worker(row, int(n), int(dim), int(threads), args.block_size)))
        return
    if args.step_worker:
        print(json.dumps(step_worker(*args.step_worker)))
        return
    if args.tiny:
        one_process_measurements()
    if args.grad_cache:
        grad_cache_table(args)
        return
    print(
        f"device: CPU ({args.threads} thread(s)), torch {torch.__version__}; embeddings [N, "
        f"{args.dim}] per view; forward + backward of the loss; peak RSS above the baseline "
        f"(VmHWM - VmRSS), {ISOLATION[args.tiny]} per cell; block_size={args.block_size}"
    )
    table = {row: [] for row in args.rows}
    header = f"{'N':>7} | " + " | ".join(f"{row:>26}" for row in args.rows)
    print(header)
    for n in args.sizes:
        cells = []
        for row in args.rows:
            result = measure(row, n, args)
            table[row].append((n, result))
            cells.append(f"{fmt(result):>26}")
        print(f"{n:>7,} | " + " | ".join(cells), flush=True)
    print()
    for n in args.sizes:
        ratios = _ratios(table, n)
        if ratios:
            print(f"N={n:,}: " + "; ".join(ratios))
    print("\n".join(gpu_estimates(table, args.dim)))


def _ratios(table: dict, n: int) -> list[str]:
    """``tiled + stats`` against each other row measured at ``n``: memory and time."""
    got = {row: dict(cells).get(n) for row, cells in table.items()}
    ours = got.get("tiled + stats")
    if not isinstance(ours, dict):
        return []
    out = []
    for row, other in got.items():
        if row != "tiled + stats" and isinstance(other, dict) and other["peak_gib"] > 0:
            mem = ours["peak_gib"] / other["peak_gib"]
            speed = ours["seconds"] / other["seconds"]
            out.append(f"tiled + stats / {row}: memory {mem:.3f}x, time {speed:.2f}x")
    return out


if __name__ == "__main__":
    main()
