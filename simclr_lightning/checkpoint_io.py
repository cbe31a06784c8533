"""Checkpoint files that are never half written, and whose load failures name the file.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file
lies in ``TMPDIR``: when that is another filesystem the final move is a copy, and a run killed
during it leaves a truncated ``last.ckpt`` that later resumes into a bare ``EOFError``."""

from __future__ import annotations

import os
import pickle
import re
import socket
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from simclr_lightning.errors import CheckpointError, SettingError

# What torch.load raises on a truncated or garbled file: the zip reader's RuntimeError, and for
# anything else (the legacy pickle format, text) what the weights-only unpickler meets in garbage:
# a memo index never stored (KeyError: 101 for "hello"), a short read (struct.error)...
UNREADABLE = (
    EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
    IndexError, struct.error,
)  # fmt: skip


def local_path(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` without a ``file://`` (or ``file:``) scheme, as fsspec reads it: ``Path`` of
    ``file:///tmp/x.ckpt`` would be a relative folder ``file:``."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith("file:"):
        return text.removeprefix("file://") if text.startswith("file://") else text[5:]
    return path


def atomic_save(
    obj: Any, path: str | os.PathLike, write: Callable[[Any, Any], Any] | None = None
) -> None:
    """``torch.save`` (or ``write(obj, binary_file)``) to a temporary file in ``path``'s own
    folder, fsync it, rename it over ``path`` and fsync the folder: a reader sees the old file
    or the new one, never part of one, even if the process is killed or the machine loses
    power."""
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
            (write or torch.save)(obj, f)
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
        if kwargs.get("mmap") and "mmap can only be used" in str(err):  # not a zip: read it all
            return read_checkpoint(path, setting, load, **{**kwargs, "mmap": False})
        refused = refused_global(err)
        if refused is not None:  # a whole file, holding more than tensors and plain values
            problem = (
                f"holds objects the weights-only loader refuses ({refused}: e.g. a pickled "
                f"model or optimizer): expected tensors and plain values, a checkpoint Lightning "
                f"wrote or a state dict (torch.save(model.state_dict(), path))"
            )
            raise CheckpointError(setting, path, problem) from err
        text = str(err).split("WeightsUnpickler error:")[-1].strip()  # not torch's advice
        first = text.splitlines()[0].split(". ")[0] if text else ""
        why = f"{type(err).__name__}: {first}" if first else type(err).__name__
        problem = _unreadable(f"is truncated or corrupt, or not a file torch.save wrote ({why})")
        raise CheckpointError(setting, path, problem) from err


def refused_global(err: BaseException) -> str | None:
    """The class or function a whole file holds that the weights-only unpickler refuses
    (``torch.nn.modules.linear.Linear`` for a pickled model), or None when ``err`` is one of
    garbage's: a truncated legacy file cuts the name of a global short (``torch._utils.``,
    ``collections.O``), leaving one that is empty or missing from its loaded module."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    if "must be imported to load" in str(err):  # nested jagged tensors, DTensors
        return "nested or distributed tensors"
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(err))
    if found is None:  # "Unsupported operand 123" and the like: not a pickle torch wrote
        return None
    module, _, name = found.group(1).rpartition(".")
    owner = sys.modules.get(module or "builtins")  # torch names builtins without the module
    if not name.isidentifier() or (owner is not None and not hasattr(owner, name)):
        return None
    return found.group(1)


def describe(content: Any) -> str:
    """What a loaded file holds, for errors: a dict's first keys, or the type of anything
    else."""
    if not isinstance(content, dict):
        return f"a {type(content).__name__}"
    keys = ", ".join(repr(k) for k in list(content)[:4])
    more = f", ... ({len(content)} keys)" if len(content) > 4 else ""
    return f"a dict with keys {keys}{more}" if content else "an empty dict"


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


def read_lazily(path: Any, setting: str) -> Any:
    """The checkpoint at a local ``path`` with its tensors memory-mapped, not read (a check of
    what it records costs no load of the weights); None for no path, a stream or a remote
    URL, which are Lightning's to read."""
    if not isinstance(path, (str, os.PathLike)) or not Path(local_path(path)).is_file():
        return None
    return read_checkpoint(path, setting, map_location="cpu", weights_only=True, mmap=True)


def check_ckpt_path(
    path: str | os.PathLike | None, model_class_path: str | None, fit: bool = False
) -> dict[str, Any]:
    """Before LightningCLI reads ``--ckpt_path`` (it loads the hyperparameters with a bare
    ``torch.load``): a truncated file, one Lightning did not write (an exported state dict,
    which it fails on with a bare KeyError), one of another model class, or for ``fit`` one
    without the optimizer's state, is a one-line error, as is ``best``, which no command
    can have. Other files are not checked; ``last``, ``hpc`` and missing paths are the
    Trainer's to resolve. The checkpoint's hyperparameters, or {}."""
    if path == "best":  # Lightning's bare ValueError, misleading when ModelCheckpoint monitors
        raise SettingError(
            "ckpt_path='best' is invalid for a command: it names the best checkpoint of a fit "
            "earlier in the same Python process; give that file (in ModelCheckpoint's "
            "dirpath), or last"
        )
    checkpoint = read_lazily(path, "ckpt_path")
    if checkpoint is None:
        return {}
    if not isinstance(checkpoint, dict) or not {"state_dict", LIGHTNING_VERSION} <= set(checkpoint):
        raise CheckpointError("ckpt_path", path, _not_lightning(checkpoint))
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
        return hparams
    fix = (
        "give it as --model.checkpoint (the encoder to evaluate); --ckpt_path resumes or "
        "evaluates a LinearEval run"
        if _short(model_class_path) == "LinearEval"
        else f"use --model {saved}, or a checkpoint of {model_class_path}"
    )
    raise CheckpointError(
        "ckpt_path", path, f"is a checkpoint of {saved}, not of --model {model_class_path}: {fix}"
    )


def check_hpc_checkpoint(default_root_dir: str | os.PathLike) -> None:
    """``--ckpt_path hpc`` without the ``hpc_ckpt_<n>.ckpt`` that Lightning's SLURM requeue
    saves in ``trainer.default_root_dir``: one line, where Lightning raised a bare ValueError."""
    folder = Path(local_path(default_root_dir))
    if _is_local_file_protocol(str(default_root_dir)) and not any(folder.glob("hpc_ckpt_*.ckpt")):
        raise SettingError(
            f"ckpt_path='hpc' is invalid here: trainer.default_root_dir={str(folder)!r} holds no "
            f"hpc_ckpt_<n>.ckpt (Lightning's SLURM requeue writes them); give a checkpoint "
            f"file, or last"
        )


LIGHTNING_VERSION = "pytorch-lightning_version"  # in every checkpoint Lightning writes


def _not_lightning(content: Any) -> str:
    """Why ``content`` cannot be a ``--ckpt_path`` (Lightning reads it with a bare KeyError)."""
    fix = (
        "give it to LinearEval as --model.checkpoint; --ckpt_path takes Lightning checkpoints "
        "(.ckpt)"
    )
    if isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
        what = "a plain state dict, e.g. from simclr-lightning-export"
    else:
        what = f"it holds {describe(content)}"
        fix = "--ckpt_path takes checkpoints Lightning wrote (.ckpt); an encoder's weights go to "
        fix += "LinearEval as --model.checkpoint"
    return f"is not a checkpoint Lightning wrote ({what}): {fix}"


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]
