"""The training settings that depend on the machine, chosen when a config leaves them unset:
where the run goes and the precision that GPU computes fastest in."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import torch


def device_kind(accelerator) -> str:
    """``cuda``, ``mps`` or ``cpu``: where ``trainer.accelerator`` will run."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__
    name = name.lower()
    if name in ("auto", "gpu", "cuda") or "cuda" in name:
        if torch.cuda.is_available():
            return "cuda"
        if name in ("auto", "gpu") and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return "mps" if "mps" in name else "cpu"


def forks(strategy: Any) -> bool:
    """Whether ``trainer.strategy`` starts its processes by forking this one (``ddp_fork``,
    ``ddp_notebook``, a DDPStrategy with ``start_method: fork``), or may: ``auto`` in an
    interactive session, where Lightning picks ``ddp_fork`` for several GPUs."""
    if strategy is None or strategy == "auto":
        return hasattr(sys, "ps1") or bool(sys.flags.interactive)  # Lightning's own test
    if isinstance(strategy, str):
        return "fork" in strategy or "notebook" in strategy
    start = getattr(strategy, "_start_method", None)  # a Strategy instance
    if start is None and hasattr(strategy, "get"):  # a class_path / init_args config
        start = (strategy.get("init_args") or {}).get("start_method")
    return start == "fork"


def hardware_precision(device: str, fork: bool = False) -> tuple[str, str]:
    """The training precision for ``device``, and why. ``fork``: processes will be forked
    from this one (``ddp_fork``, ``ddp_notebook``), which must then not initialise CUDA."""
    if device == "cuda" and native_bf16(fork):
        return "bf16-mixed", "a CUDA GPU with bfloat16 units, compute capability 8.0 or newer"
    if device == "cuda":
        return "16-mixed", "a CUDA GPU without bfloat16 units, compute capability below 8.0"
    where = "a CPU" if device == "cpu" else device
    return "32-true", f"no CUDA GPU: on {where} float32 is faster than bf16 or fp16"


def native_bf16(fork: bool = False) -> bool:
    """Whether the GPU computes in bfloat16 natively (compute capability 8.0, Ampere, or
    newer). ``torch.cuda.is_bf16_supported()`` says yes on older GPUs too (V100, T4), which
    only emulate it, slowly, where float16 has tensor cores. With ``fork`` the question is
    put to a child process: CUDA initialised here would fail every forked DDP process."""
    if fork and not torch.cuda.is_initialized():
        return (capability_in_child() or (0, 0))[0] >= 8
    return torch.cuda.get_device_capability()[0] >= 8


def capability_in_child() -> tuple[int, int] | None:
    """The GPU's compute capability, asked of a fresh process (None if it cannot say)."""
    code = "import torch; print(*torch.cuda.get_device_capability())"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
        )
        major, minor = done.stdout.split()[-2:]
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
