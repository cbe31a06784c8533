"""Checkpoint files that are never half written, and whose load failures name the file.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file
lies in ``TMPDIR``: when that is another filesystem the final move is a copy, and a run killed
during it leaves a truncated ``last.ckpt`` that later resumes into a bare ``EOFError``."""

from __future__ import annotations

import os
import pickle
import re
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from simclr_lightning.errors import CheckpointError

# What torch.load raises on a truncated or garbled file (zip reader, legacy pickle format).
UNREADABLE = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def local_path(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` without a ``file://`` (or ``file:``) scheme, as fsspec reads it: ``Path`` of
    ``file:///tmp/x.ckpt`` would be a relative folder ``file:``."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith("file:"):
        return text.removeprefix("file://") if text.startswith("file://") else text[5:]
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in ``path``'s own folder, fsync it, rename it over
    ``path`` and fsync the folder: a reader sees the old file or the new one, never part of
    one, even if the process is killed or the machine loses power."""
    path = Path(local_path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent)
        # Not named after the checkpoint: Lightning's SLURM resume reads the digits after
        # "hpc_ckpt_" in any file name as a checkpoint number.
        fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(), suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() follows the umask
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _naming(err, path) from err
        raise
    _fsync_dir(path.parent)


STALE_AFTER_S = 300.0


def _partial_prefix() -> str:
    """``.partial-<host>-<pid>-``: whose temporary file it is, so a later save can tell one
    left by a writer that was killed (SIGKILL, a node's OOM killer) from one being written."""
    return f".partial-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_partials(folder: Path) -> None:
    """Delete the temporary files of killed writers on this host in ``folder`` (their process
    is gone and the file untouched for ``STALE_AFTER_S``): each is as large as a checkpoint,
    and a job preempted many times would otherwise fill the disk with them. Files of other
    hosts (a shared filesystem) and of live processes are left alone."""
    pattern = re.compile(rf"\.partial-{re.escape(socket.gethostname())}-(\d+)-\w+\.tmp")
    now = time.time()
    for entry in os.scandir(folder):
        found = pattern.fullmatch(entry.name)
        if found is None or _alive(int(found.group(1))):
            continue
        try:
            if now - entry.stat().st_mtime > STALE_AFTER_S:
                os.unlink(entry.path)
        except OSError:  # removed by another process first, or not ours to remove: no matter
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: another user's live process
        return True
    return True


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming the file being saved rather than the temporary one, or than no file at
    all: a full disk surfaces from ``torch.save`` as a bare ``OSError(28, '...')``."""
    if err.errno is None:
        return err
    name = os.fspath(err.filename) if isinstance(err.filename, (str, os.PathLike)) else ""
    if name and not os.path.basename(name).startswith(".partial-"):  # e.g. a folder above
        return OSError(err.errno, f"{err.strerror} (saving {path})", err.filename)
    return OSError(err.errno, err.strerror, str(path))  # OSError(errno) picks the subclass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(
    path: str | os.PathLike, setting: str, load: Callable[..., Any] = torch.load, **kwargs: Any
) -> Any:
    """``load(path, **kwargs)`` (``torch.load``), with a :class:`CheckpointError` naming
    ``setting`` and the file when it is missing, empty, truncated or corrupt. A ``file://``
    URL is read as the local path it names."""
    path = local_path(path)
    if not Path(path).is_file():
        raise CheckpointError(setting, path, "does not exist: give the path of a .ckpt file")
    if Path(path).stat().st_size == 0:
        raise CheckpointError(setting, path, _unreadable("is empty (0 bytes)"))
    try:
        return load(path, **kwargs)
    except UNREADABLE as err:
        if isinstance(err, pickle.UnpicklingError) and "Weights only load" in str(err):
            raise  # a complete file holding objects weights_only refuses: not corruption
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        why = f"{type(err).__name__}: {first}" if first else type(err).__name__
        problem = _unreadable(f"is truncated or corrupt ({why})")
        raise CheckpointError(setting, path, problem) from err


def _unreadable(problem: str) -> str:
    return (
        f"{problem}: a save was cut short or the file was damaged; use another checkpoint "
        f"(e.g. an earlier epoch's)"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, saving through :func:`atomic_save` (temporary file
    in the checkpoint's folder whatever ``TMPDIR`` is, fsynced, then renamed) and loading with
    a one-line error that names a missing, empty or truncated file. The ``simclr-lightning``
    command uses it unless ``trainer.plugins`` has a CheckpointIO; in Python pass
    ``Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths (``s3://`` ...) keep Lightning's
    fsspec transaction."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(
            path,
            "ckpt_path",
            super().load_checkpoint,
            map_location=map_location,
            weights_only=weights_only,
        )


def check_ckpt_path(
    path: str | os.PathLike | None, model_class_path: str | None, fit: bool = False
) -> None:
    """Before LightningCLI reads ``--ckpt_path`` (it loads the hyperparameters with a bare
    ``torch.load``): a truncated file, one of another model class, or for ``fit`` one without
    the optimizer's state, is a one-line error. Only files are checked; ``last``/``best`` and
    missing paths are the Trainer's to resolve."""
    if not path or not Path(local_path(path)).is_file():
        return
    load = {"map_location": "cpu", "weights_only": True, "mmap": True}  # mmap: reads no tensors
    checkpoint = read_checkpoint(path, "ckpt_path", **load)
    if fit and isinstance(checkpoint, dict) and "optimizer_states" not in checkpoint:
        raise CheckpointError(
            "ckpt_path",
            path,
            "holds only the weights (ModelCheckpoint's save_weights_only), which cannot resume "
            "a fit: resume from a full checkpoint (last.ckpt), or use these weights elsewhere "
            "(validate, simclr-lightning-export, LinearEval's --model.checkpoint)",
        )
    hparams = (checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    saved = hparams.get("_class_path")
    if not saved or not model_class_path or _short(saved) == _short(model_class_path):
        return
    fix = (
        "give it as --model.checkpoint (the encoder to evaluate); --ckpt_path resumes or "
        "evaluates a LinearEval run"
        if _short(model_class_path) == "LinearEval"
        else f"use --model {saved}, or a checkpoint of {model_class_path}"
    )
    raise CheckpointError(
        "ckpt_path", path, f"is a checkpoint of {saved}, not of --model {model_class_path}: {fix}"
    )


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]
