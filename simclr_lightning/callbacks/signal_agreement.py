"""The step at which every process acts on a scheduler's signal: SIGTERM (stop) and SLURM's
requeue signal (save, then requeue the job).

Lightning 2.6 acts inside its signal handlers. A handler runs between two Python instructions
of whatever the process was doing, so the collective it starts meets whichever collective the
other ranks are in at that moment (a gradient all-reduce, Lightning's per-step broadcast), or
none at all when the signal reached one rank only, and the run hangs instead of saving:

- its SIGTERM handler broadcasts rank 0's flag. Each rank also stops on its own flag at the
  end of a step, so ranks signalled a moment apart can stop after different steps;
- its SLURM requeue handler saves a checkpoint (a barrier) in the middle of a step;
- and before every training step it broadcasts rank 0's flag on the run's backend: under
  NCCL, a wait for the GPU at every step.

:class:`SignalAgreement` keeps those handlers minus their work: each only notes its signal.
At the end of every training step all ranks all-reduce (MAX, on a gloo group: hosts wait for
each other, never for the GPU) which signals reached any of them, and then act together:
Lightning's stop flag set on every rank at once (it stops all of them after that step, as in
one process), or the requeue's checkpoint saved at a step's end; Lightning's per-step
broadcast has then nothing left to do and is skipped. One process has nothing to
agree with: its handler sets Lightning's flag at once, as Lightning's own; its requeue
checkpoint also waits for the step's end, so that it holds a finished step.

Under gradient accumulation every process acts only after a batch that stepped the optimizer
(the epoch's last one steps too): no checkpoint holds ``.grad``, and a run stopped in the
middle of an accumulation resumed with only its later batches' gradients.
"""

from __future__ import annotations

import signal
import weakref
from types import FrameType
from typing import Any
from weakref import WeakKeyDictionary

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_warn

from simclr_lightning.distributed import HostGroup

STOP = 1  # a SIGTERM
REQUEUE = 2  # SLURM's requeue signal (``--signal=USR1@90``)

# Lightning's handler methods, on its trainer's ``_signal_connector``
NOTIFIERS = {STOP: "_sigterm_notifier_fn", REQUEUE: "_slurm_sigusr_handler_fn"}
BROADCAST = "_broadcast_sigterm_tensor"  # its training loop's per-step broadcast of the flag


class SignalAgreement:
    """See :mod:`this module <simclr_lightning.callbacks.signal_agreement>`."""

    def __init__(self) -> None:
        self.received = 0  # the signals (STOP | REQUEUE) that reached this process
        self.handles = 0  # those whose Lightning handler this one replaced, this fit
        self._launcher: Any = None
        self._alone: weakref.ref[L.Trainer] | None = None  # a one-process run's trainer
        self._group = HostGroup()

    def install(self, trainer: L.Trainer) -> None:
        """Take the place of Lightning's handlers registered for this fit (Lightning restores
        the previous ones at its teardown). Call it before the sanity check and before
        training: the second call finds them in place."""
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        signals = {REQUEUE: requeue_signal(trainer), STOP: signal.SIGTERM}
        connector = getattr(trainer, "_signal_connector", None)
        ours = {STOP: self.note_stop, REQUEUE: self.note_requeue}
        handles = 0
        for kind, signum in signals.items():
            if signum is None:
                continue
            handlers = getattr(signal.getsignal(signum), "signal_handlers", None)
            for i, handler in enumerate(handlers if isinstance(handlers, list) else []):
                if getattr(handler, "__self__", None) is connector and (
                    getattr(handler, "__name__", None) == NOTIFIERS[kind]
                ):
                    handlers[i] = ours[kind]  # a new fit's handler: nothing received yet
                    self.received &= ~kind
                    handles |= kind
                elif handler == ours[kind]:
                    handles |= kind
        if distributed and not handles & STOP:
            rank_zero_warn(
                "simclr-lightning could not find Lightning's SIGTERM handler: under DDP a "
                "SIGTERM may stop the processes after different steps"
            )
        self.handles = handles
        if self.handles:
            _INSTALLED[trainer] = self
        if self.handles & STOP:
            # Lightning's per-step broadcast of rank 0's flag: a wait for the GPU at every
            # step (Lightning-AI/pytorch-lightning#21487), and with the agreement nothing left
            # to do (every rank stops on the agreed flag before the next step). Shadowed on
            # this trainer's loop only, until teardown.
            loop = trainer.fit_loop.epoch_loop
            if callable(getattr(loop, BROADCAST, None)):
                setattr(loop, BROADCAST, _skip_broadcast)
        self._launcher = trainer.strategy.launcher
        self._alone = None if distributed else weakref.ref(trainer)
        if distributed:
            self._group.get()  # made now, in every process at the same point

    def note_stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM's handler: pass it on to the processes Lightning started (as Lightning's
        does), once, and note it. One process stops at once (a validation at its next batch),
        as with Lightning's handler, unless in the middle of an accumulation."""
        if not self.received & STOP and self._launcher is not None:
            self._launcher.kill(signum)
        self.received |= STOP
        trainer = self._alone() if self._alone is not None else None
        if trainer is not None and not accumulating(trainer):
            trainer._signal_connector.received_sigterm = True

    def note_requeue(self, signum: int, frame: FrameType | None) -> None:
        self.received |= REQUEUE

    def agree(self, trainer: L.Trainer) -> int:
        """Call at the same point of every training step in every process: the signals that
        reached any process since the last call (STOP | REQUEUE), the same in all of them.
        On STOP, Lightning's own flag is set: it stops every process after this step. In the
        middle of an accumulation, none: they wait for the batch that steps."""
        flags = self.pending(trainer)
        if accumulating(trainer):
            return 0
        if flags & REQUEUE:
            # SLURM warns a job once, each task at about the same moment: a task whose
            # signal comes a step later than the others' must not requeue the job again.
            self.handles &= ~REQUEUE
        return flags

    def pending(self, trainer: L.Trainer) -> int:
        """:meth:`agree` without taking the requeue: for a long pass of this library's own
        (the kNN bank) that cuts itself short, after which training acts on the signal."""
        if not self.handles:
            return 0
        flags = self.received & self.handles
        if trainer.world_size > 1:
            found = torch.tensor([flags & STOP, flags & REQUEUE], dtype=torch.int32)
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self._group.get())
            flags = int(found[0]) | int(found[1])
        if flags & STOP:  # (held back, and set again at the batch that steps)
            trainer._signal_connector.received_sigterm = not accumulating(trainer)
        return flags

    def uninstall(self, trainer: L.Trainer) -> None:
        """The fit is over (Lightning has restored the handlers it replaced)."""
        self.handles = 0
        self._alone = None
        _INSTALLED.pop(trainer, None)
        vars(trainer.fit_loop.epoch_loop).pop(BROADCAST, None)


def _skip_broadcast() -> None:
    pass


# Lightning's test is private: read defensively (also from a signal handler).
def accumulating(trainer: L.Trainer) -> bool:
    """Whether the training batch in progress (or just finished) leaves its gradients for a
    later batch's optimizer step (Lightning's own test), the same in every process."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    should_accumulate = getattr(loop, "_should_accumulate", None)
    try:
        return callable(should_accumulate) and bool(should_accumulate())
    except Exception:  # (a loop not set up yet)
        return False


# The agreement installed in each running trainer (the Preemption callback's).
_INSTALLED: WeakKeyDictionary[L.Trainer, SignalAgreement] = WeakKeyDictionary()


def stop_requested(trainer: L.Trainer) -> bool:
    """Whether the run is being stopped (SIGTERM) or warned (SLURM's requeue signal): the same
    answer in every process, which must all call it at the same point. In one process,
    Lightning's own flag counts; under DDP only a signal the processes agreed on (through the
    Preemption callback, which every ``simclr-lightning`` run has): a rank that cut its pass
    alone would leave the others waiting in a collective."""
    agreement = _INSTALLED.get(trainer)
    flags = agreement.pending(trainer) if agreement is not None else 0
    if trainer.world_size > 1:
        return bool(flags)
    return bool(flags) or trainer.received_sigterm


# Lightning keeps the cluster environment of a one-device run in a private connector: read
# defensively, so that a Lightning release that moves it cannot fail the save at a stop.
def cluster_environment(trainer: L.Trainer) -> object | None:
    """The run's cluster environment: a multi-process strategy has it publicly; a one-device
    run keeps it only in Lightning's accelerator connector."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        connector = getattr(trainer, "_accelerator_connector", None)
        env = getattr(connector, "cluster_environment", None)
    return env


def requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal SLURM sends before the time limit, when Lightning requeues on it."""
    env = cluster_environment(trainer)
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        return env.requeue_signal or signal.SIGUSR1
    return None
