"""The one way this library rejects a setting: an error that names it, its value and what is
allowed, raised before any work is done."""

from __future__ import annotations


class SettingError(ValueError):
    """A setting or input that cannot work. Its message is one line, meant for the user."""


def require(ok: bool, setting: str, value: object, allowed: str) -> None:
    """Raise :class:`SettingError` ``"<setting>=<value> is invalid: must be <allowed>"``
    unless ``ok``; ``setting`` is the name a user sets it by (``model.base_lr``)."""
    if not ok:
        raise SettingError(f"{setting}={value!r} is invalid: must be {allowed}")


class CorruptImageError(ValueError):
    """A data file that cannot be decoded. Its message is one line naming the file; a run that
    stops on it writes a checkpoint first, and ``data.skip_corrupt`` skips such files."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot decode image file {path!r} ({reason}): remove or replace it, set "
            f"data.skip_corrupt=true to skip bad files, or data.verify=true to list them all"
        )
        self.path = path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (missing, empty, truncated, or of the wrong kind).
    Its message is one line naming the setting that gave the file, the file and what to do."""

    def __init__(self, setting: str, path: object, problem: str) -> None:
        super().__init__(f"{setting}={str(path)!r} {problem}")
        self.path = str(path)
