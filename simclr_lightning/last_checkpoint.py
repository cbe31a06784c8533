"""What ``--ckpt_path last`` resumes when the checkpoints live in a logger's versioned folder.

Lightning looks for ``last.ckpt`` only in this run's own ``ModelCheckpoint`` folder. Without a
``dirpath`` that folder is the logger's: ``lightning_logs/version_<N>/checkpoints``, or
``<project>/<run id>/checkpoints`` under W&B, a new and empty one for every run. The stopped
run's ``last.ckpt`` sits in the previous version's folder, and a "resumed" run silently
trained from scratch (Lightning only warns)."""

from __future__ import annotations

import glob
import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint


def earlier_runs_lasts(trainer: L.Trainer) -> list[str]:
    """The ``last*.ckpt`` files in the checkpoint folders of earlier runs logged like this one
    (``<save_dir>/<name>/*/checkpoints/``); none where Lightning's own rule finds them: a
    ``ModelCheckpoint`` with a fixed ``dirpath``, or no logger (``<default_root_dir>/
    checkpoints``, the same folder every run)."""
    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    if not callbacks or any(c.dirpath is not None for c in callbacks) or not trainer.loggers:
        return []
    logger = trainer.loggers[0]
    save_dir = logger.save_dir or trainer.default_root_dir
    last = callbacks[0].CHECKPOINT_NAME_LAST
    pattern = os.path.join(save_dir, str(logger.name or ""), "*", "checkpoints", f"{last}*.ckpt")
    return [path for path in glob.glob(pattern) if os.path.isfile(path)]


def fixed_folder_lasts(trainer: L.Trainer) -> list[str]:
    """The files Lightning's own ``--ckpt_path last`` rule takes the newest of: the
    ``last*.ckpt`` in each ``ModelCheckpoint``'s fixed ``dirpath`` (``<default_root_dir>/
    checkpoints`` without a logger), and an ``OnExceptionCheckpoint``'s file."""
    lasts = []
    for callback in trainer.callbacks:
        if isinstance(callback, OnExceptionCheckpoint):  # Lightning's rule counts it too
            lasts.append(callback.ckpt_path)
        if not isinstance(callback, ModelCheckpoint):
            continue
        folder = callback.dirpath  # None until setup: without a logger, Lightning's own
        if folder is None and not trainer.loggers:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
        if folder is not None:
            name = f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}"
            lasts += glob.glob(os.path.join(glob.escape(str(folder)), name))
    return [path for path in lasts if os.path.isfile(path)]


def last_to_resume(trainer: L.Trainer) -> str | None:
    """The file ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` of the earlier runs'
    or the fixed folders, or a newer stop's ``hpc_ckpt`` (:func:`newer_stop_checkpoint`)."""
    found = earlier_runs_lasts(trainer) + fixed_folder_lasts(trainer)
    last = max(found, key=os.path.getmtime) if found else None
    return newer_stop_checkpoint(trainer, last) or last


def newer_stop_checkpoint(trainer: L.Trainer, last: str | None) -> str | None:
    """The newest ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` when it is newer than every
    ``last*.ckpt`` ``--ckpt_path last`` would take (``last``, or those in the checkpoint
    folders), else None. A stop under SLURM saves there, not as ``last.ckpt``: a requeued job
    resumes from it by itself, but one started again with ``--ckpt_path last`` (as exit code
    143 asks) silently trained from the older ``last.ckpt``, or from scratch."""
    stops = glob.glob(os.path.join(glob.escape(str(trainer.default_root_dir)), "hpc_ckpt_*.ckpt"))
    stops = [path for path in stops if os.path.isfile(path)]
    if not stops:
        return None
    lasts = ([last] if last else []) + fixed_folder_lasts(trainer)
    newest = max(stops, key=os.path.getmtime)
    if any(os.path.getmtime(path) >= os.path.getmtime(newest) for path in lasts):
        return None
    return newest


# the step-0 states Lightning's batch-size and learning-rate finders save, restore and delete
TUNER_CHECKPOINTS = (".scale_batch_size_", ".lr_find_")


def resumed_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint this fit resumed from: ``trainer.ckpt_path``, unless it is a tuner's
    own restore of the step-0 state it saved (a run tuned by ``BatchSizeFinder`` started
    afresh)."""
    path = trainer.ckpt_path
    if not path or os.path.basename(str(path)).startswith(TUNER_CHECKPOINTS):
        return None
    return str(path)
