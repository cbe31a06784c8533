"""The one way this library rejects a setting: an error that names it, its value and what is
allowed, raised before any work is done."""

from __future__ import annotations

import ast
import re


class SettingError(ValueError):
    """A setting or input that cannot work. Its message is one line, meant for the user."""


def require(ok: bool, setting: str, value: object, allowed: str) -> None:
    """Raise :class:`SettingError` ``"<setting>=<value> is invalid: must be <allowed>"``
    unless ``ok``; ``setting`` is the name a user sets it by (``model.base_lr``)."""
    if not ok:
        raise SettingError(f"{setting}={value!r} is invalid: must be {allowed}")


_CORRUPT = re.compile(r"cannot decode image file ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\") \((.*)\)")


class CorruptImageError(ValueError):
    """A data file that cannot be decoded. Its message is one line naming the file; a run that
    stops on it writes a checkpoint first, and ``data.skip_corrupt`` skips such files.

    Built from its message alone it recovers ``path`` and ``reason``: torch re-raises a
    DataLoader worker's error as ``type(err)(worker_traceback_text)`` (and pickle rebuilds it
    from ``args``), which would otherwise turn it into a bare ``RuntimeError``."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        traceback_text = None
        if reason is None:  # rebuilt from a message: the last one in it is the error's own
            found = _CORRUPT.findall(path)
            traceback_text = path if "\n" in path else None
            path, reason = (ast.literal_eval(found[-1][0]), found[-1][1]) if found else ("?", path)
        reason = " ".join(str(reason).split())  # one line, whatever the decoder said
        super().__init__(
            f"cannot decode image file {path!r} ({reason}): remove or replace it, set "
            f"data.skip_corrupt=true to skip bad files, or data.verify=true to list them all"
        )
        self.path = path
        self.reason = reason
        if traceback_text is not None:  # where it happened, for SIMCLR_DEBUG tracebacks
            self.add_note(traceback_text.rstrip())

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class CorruptImageStop(CorruptImageError):
    """A :class:`CorruptImageError` that every process of a distributed run raises at the same
    step, before training it, so a checkpoint of the last finished step can still be saved
    (:mod:`simclr_lightning.data.failed_batches`)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (missing, empty, truncated, or of the wrong kind).
    Its message is one line naming the setting that gave the file, the file and what to do."""

    def __init__(self, setting: str, path: object, problem: str) -> None:
        super().__init__(f"{setting}={str(path)!r} {problem}")
        self.path = str(path)


class DataFileError(ValueError):
    """A dataset file that is there but cannot be read (truncated, damaged, another format).
    Its message is one line naming the setting that points at it, the file and what to do."""

    def __init__(self, setting: str, value: object, path: object, problem: str, fix: str):
        super().__init__(f"{setting}={str(value)!r}: {path} {problem}: {fix}")
        self.path = str(path)
