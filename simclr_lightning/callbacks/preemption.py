"""A checkpoint of the last finished step when a run is stopped: by SIGTERM (a scheduler's
preemption, SLURM's requeue or time limit) or by an undecodable data file."""

from __future__ import annotations

import os
import re
import subprocess

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from simclr_lightning.callbacks.signal_agreement import (
    REQUEUE,
    SignalAgreement,
    cluster_environment,
)
from simclr_lightning.errors import CorruptImageError, CorruptImageStop
from simclr_lightning.last_checkpoint import resumed_checkpoint

# What a process killed by SIGTERM reports (128 + 15): the code schedulers and shells expect
# from a run that was stopped, not finished.
SIGTERM_EXIT_CODE = 143


class Preemption(Callback):
    """On SIGTERM, Lightning lets the current step finish, then raises ``SIGTERMException``.
    Under DDP every rank must stop after the same step, whichever of them the signal reached:
    this callback makes them agree at the end of each step
    (:class:`~simclr_lightning.callbacks.signal_agreement.SignalAgreement`; under DDP a
    signal during validation stops the run after the next training step). It then saves a
    checkpoint of that step, so no step is lost:

    - normally as ``last.ckpt`` in the ``ModelCheckpoint``'s folder, which
      ``--ckpt_path last`` picks (Lightning takes the newest ``last*.ckpt`` there);
    - under SLURM with ``SLURMEnvironment(auto_requeue=True)`` (Lightning's default there) as
      the next ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``, which the requeued job resumes
      from without any ``--ckpt_path`` (Lightning's own HPC resume takes the highest n).
      SLURM's requeue signal (``--signal=USR1@90``) saves one too, at the end of the step it
      arrives in (Lightning's own handler saves in the middle of it), then requeues the job.
      Once a requeued job finishes, its ``hpc_ckpt_<n>.ckpt`` files are removed: the next
      job in that folder would resume from them.

    With gradient accumulation the stop waits for the batch that steps the optimizer: no
    checkpoint holds the gradients accumulated so far.

    On :class:`~simclr_lightning.errors.CorruptImageError` (a file that cannot be decoded,
    without ``data.skip_corrupt``) it saves the same checkpoint. Under DDP it can do so when
    every process stops at the same batch
    (:class:`~simclr_lightning.errors.CorruptImageStop`), which this library's data modules
    arrange for their training, validation and kNN-bank loaders. Elsewhere (a data module of
    the user's own) the other ranks are waiting for the failed one in a collective, so
    nothing can be saved and it says so. The ``simclr-lightning`` command adds this callback
    to every run and exits with :data:`SIGTERM_EXIT_CODE` after a SIGTERM.
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None
        self._resumed_from: str | None = None
        self._first_step: int | None = None  # global_step when this fit's training started
        self._requeued = False  # this fit saved an hpc_ckpt and requeued the job
        self._stopping = False  # saving a stop's checkpoint now
        self._resumed_stop = False  # the checkpoint this fit resumed from is a stop's
        self._signals = SignalAgreement()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        first_step, self._first_step = self._first_step, None  # (no teardown after this)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if not isinstance(exception, (SIGTERMException, CorruptImageError)):
            return
        if first_step in (None, trainer.global_step):
            # Stopped in setup (data.verify, the resident store), the checkpoint's restore, the
            # sanity check or the first step: saving now would write untrained weights over
            # the checkpoint resumed from, or over an earlier run's last.ckpt. Checked first:
            # under DDP too, nothing trained, so no ModelCheckpoint file to point to.
            rank_zero_info(
                "simclr-lightning: stopped before this run finished a step: no checkpoint "
                "written (nothing new to save; the checkpoints already there are kept)"
            )
            return
        alone = not isinstance(exception, CorruptImageStop)
        if isinstance(exception, CorruptImageError) and alone and trainer.world_size > 1:
            rank_zero_warn(
                "no checkpoint written: a corrupt image stopped one process of a distributed "
                "run; the last checkpoint is the one ModelCheckpoint wrote"
            )
            return
        self.saved_path = self.checkpoint_path(trainer)
        claim_last(trainer, self.saved_path)
        self._stopping = True
        try:
            trainer.save_checkpoint(self.saved_path, weights_only=False)
        finally:
            self._stopping = False
        rank_zero_info(
            f"simclr-lightning: stopped after step {trainer.global_step}; saved "
            f"{self.saved_path} ({self.resume_hint(trainer)})"
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resumed_from = resumed_checkpoint(trainer)
        self._first_step = None  # set once the checkpoint is restored and training starts
        self._requeued = False

    # Lightning registers its SIGTERM handler after on_fit_start, before the sanity check.
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signals.install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = trainer.global_step
        self._signals.install(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict) -> None:  # fmt: skip
        if self._stopping:  # what a finished resume may remove, and nothing else
            checkpoint["preemption_stop"] = True

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict) -> None:  # fmt: skip
        self._resumed_stop = bool(checkpoint.get("preemption_stop"))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._first_step = None
        self._resumed_stop = False
        self._signals.uninstall(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self._signals.agree(trainer) & REQUEUE:
            self.save_and_requeue(trainer)

    def save_and_requeue(self, trainer: L.Trainer) -> None:
        """SLURM's warning before the time limit, in every process after the same step: what
        Lightning's own handler does mid-step. The requeue's SIGTERM then stops the run."""
        for logger in trainer.loggers:
            logger.save()
        path = hpc_save_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        rank_zero_info(f"simclr-lightning: SLURM's requeue signal: saved {path}")
        self._requeued = True
        if trainer.is_global_zero:
            requeue_slurm_job()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from our last.ckpt that then finishes leaves it stale: a later
        # ``--ckpt_path last`` would go back to the preemption point. Remove it unless
        # ModelCheckpoint keeps last.ckpt itself (then it holds the final step).
        resumed = self._resumed_from
        if not resumed or trainer.interrupted:
            return
        if self.requeues(trainer) or HPC_CHECKPOINT.fullmatch(os.path.basename(resumed)):
            # (a job this fit requeued comes back, and resumes from the newest of them; one
            # resumed from a stop's hpc_ckpt by --ckpt_path last leaves none either)
            if not self._requeued:
                remove_hpc_checkpoints(trainer, resumed)
            return
        checkpoint = trainer.checkpoint_callback
        keeps_last = isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last
        own = self.checkpoint_path(trainer)
        # (an earlier version's file only where a stop wrote it: never another run's last)
        stale = os.path.abspath(resumed) == os.path.abspath(own) or (
            self._resumed_stop and same_last(resumed, own)
        )
        if not keeps_last and stale:
            trainer.strategy.remove_checkpoint(resumed)

    @staticmethod
    def requeues(trainer: L.Trainer) -> bool:
        env = cluster_environment(trainer)
        return isinstance(env, SLURMEnvironment) and env.auto_requeue

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        if self.requeues(trainer):
            return hpc_save_path(trainer)
        checkpoint = trainer.checkpoint_callback
        folder = None
        if isinstance(checkpoint, ModelCheckpoint):
            folder = checkpoint.dirpath
            name = checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION
        else:
            name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        return os.path.join(folder or trainer.default_root_dir, name)

    def resume_hint(self, trainer: L.Trainer) -> str:
        if self.requeues(trainer):
            return "a requeued SLURM job resumes from it"
        if isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            return "resume with --ckpt_path last"
        return f"resume with --ckpt_path {self.saved_path}"


def claim_last(trainer: L.Trainer, path: str) -> None:
    """Make ``ModelCheckpoint(save_last=True)`` take the stop's ``last.ckpt`` for its own. A
    stop before its first save of the run leaves its ``last_model_path`` empty; the resumed
    run, finding a ``last.ckpt`` that is not its, wrote the final step to ``last-v1.ckpt``
    and left ``last.ckpt`` at the stop. Set before the save: its state is in the checkpoint."""
    checkpoint = trainer.checkpoint_callback
    if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.save_last:
        return
    name = checkpoint.CHECKPOINT_NAME_LAST
    if checkpoint.dirpath and "{" not in name:  # (a templated name is never the stop's)
        own = os.path.join(checkpoint.dirpath, name + checkpoint.FILE_EXTENSION)
        if os.path.abspath(own) == os.path.abspath(path):
            checkpoint.last_model_path = own


HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def remove_hpc_checkpoints(trainer: L.Trainer, resumed: str) -> None:
    """A requeued job resumed from ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` finished:
    remove it and the earlier ones there (its predecessors' stops), or the next SLURM job in
    that folder would silently resume from the newest (Lightning's own HPC resume)."""
    folder = trainer.default_root_dir
    resumed_from = HPC_CHECKPOINT.fullmatch(os.path.basename(resumed))
    # (the same answer in every process: only rank 0 reads the folder)
    here = os.path.abspath(os.path.dirname(resumed)) == os.path.abspath(folder)
    if resumed_from is None or not here:
        return
    if trainer.is_global_zero and os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            found = HPC_CHECKPOINT.fullmatch(name)
            if found and int(found[1]) <= int(resumed_from[1]):
                trainer.strategy.remove_checkpoint(os.path.join(folder, name))
    # every rank returns once they are gone: a next fit must not find them
    trainer.strategy.barrier("simclr_lightning.remove_hpc_checkpoints")


# Lightning's helper for the next name is private: read defensively, as the cluster
# environment (signal_agreement.cluster_environment).
def hpc_save_path(trainer: L.Trainer) -> str:
    """``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``, n one above the highest there: the name
    Lightning's own SLURM resume looks for (its ``hpc_save_path``, when it still has one)."""
    folder = trainer.default_root_dir
    connector = getattr(trainer, "_checkpoint_connector", None)
    if callable(getattr(connector, "hpc_save_path", None)):
        return connector.hpc_save_path(folder)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    numbers = [int(m[1]) for name in names if (m := HPC_CHECKPOINT.fullmatch(name))]
    return os.path.join(folder, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (this task of an array job), as Lightning's handler."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    if not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn(f"not requeued: SLURM_JOB_ID={job!r} is not a SLURM job id")
        return
    try:
        code = subprocess.call(["scontrol", "requeue", job])
    except OSError as err:
        code = f"{type(err).__name__}: {err}"
    if code != 0:
        rank_zero_warn(f"requeueing SLURM job {job} failed ({code}); the run goes on")


def same_last(resumed: str, own: str) -> bool:
    """Whether ``resumed`` is this run's stop file ``own``, or where an earlier run logged
    beside it saves one (``version_0/checkpoints/last.ckpt`` for ``version_1/checkpoints/
    last.ckpt``): a resumed run logs to a new version, and the stale file there was left for
    ``--ckpt_path last`` to go back to."""
    a, b = os.path.abspath(resumed), os.path.abspath(own)
    parts = [(os.path.basename(p), os.path.basename(os.path.dirname(p))) for p in (a, b)]
    folders = [os.path.dirname(os.path.dirname(os.path.dirname(p))) for p in (a, b)]
    return a == b or (parts[0] == parts[1] and folders[0] == folders[1])
