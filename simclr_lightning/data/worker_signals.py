"""Loader workers that outlive a scheduler's stop signal, so the training process can finish
its step and save it.

SLURM sends SIGTERM at a time limit, a preemption or ``scancel`` (and the ``--signal`` warning,
usually SIGUSR1, before it) to every process of a job step: the loader workers too. torch's
worker dies of a SIGTERM that its parent did not send, and the training process then raises
"DataLoader worker ... is killed by signal" wherever it stands, before Lightning can stop
after the step and :class:`~simclr_lightning.callbacks.preemption.Preemption` can save it: the
work since the last checkpoint is lost. With ``num_workers=0`` the same stop saves its step.

In a shielded worker these signals are ignored when another process sends them; when the
training process sends SIGTERM (torch's own shutdown, or multiprocessing's at exit) the worker
ends at once, as torch's handler ends it. A worker still stops when the training process
shuts its loader down (as Lightning does when a run stops) or dies, and by SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

from lightning.fabric.utilities.seed import pl_worker_init_function

# What schedulers send before a kill: SIGTERM; SLURM's --signal warning (Lightning's requeue
# signal is SIGUSR1). Each would end a worker by default.
STOP_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)  # Windows has SIGTERM alone (and no sigwaitinfo: the shield is off there)


# Imported in the fork server, not in each worker: see preload_in_forkserver.
FORKSERVER_PRELOAD = ("numpy", "torch", "lightning", __name__)


def preload_in_forkserver() -> None:
    """Under the "forkserver" start method (Python 3.14's default on Linux) a worker imports
    numpy, torch and lightning itself, and numpy's OpenBLAS starts its thread pool there
    before ``worker_init_fn`` runs: those threads do not block the stop signals, and one they
    take ends the worker (the shield's mask is per thread). Imported once in the fork server,
    they are in every worker it forks, with no thread of theirs (a fork copies one thread).
    Keeps any preload already asked for; no effect on a fork server already running."""
    try:
        from multiprocessing import forkserver
    except ImportError:  # no fork server on this platform
        return
    asked = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    forkserver.set_forkserver_preload(asked + [m for m in FORKSERVER_PRELOAD if m not in asked])


preload_in_forkserver()


def shield_from_stop_signals(worker_id: int = 0) -> None:
    """A ``worker_init_fn``: from here on, stop signals from any process but the parent are
    ignored. They are blocked in this (the worker's main) thread, which threads started later
    inherit, and a watcher thread takes each one with its sender (``sigwaitinfo``).

    Lightning adds its own ``worker_init_fn`` only to a loader that has none: under
    ``seed_everything(workers=True)`` (the CLI's) it seeds each worker's torch, NumPy and
    ``random`` from (seed, worker, rank). It is called here in its place, or every rank's
    workers would draw the same numbers."""
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # Lightning's own test for adding it
        pl_worker_init_function(worker_id)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS or Windows: left as torch sets it
        return
    # The training process: the worker's parent, or under "forkserver" (Python 3.14's default
    # on Linux) the process that asked the server for it.
    creator = multiprocessing.parent_process()
    parents = {os.getppid(), creator.pid if creator is not None else os.getppid()}
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_watch, args=(parents,), name="stop-signal-shield", daemon=True).start()


def _watch(parents: set[int]) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid in parents and info.si_signo == signal.SIGTERM:
            os._exit(0)  # the loader's own shutdown: end now and quietly, as torch's handler does
