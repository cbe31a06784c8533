"""The order of stacked ``--config`` files: an overlay that appends callbacks (``callbacks+:``,
as ``configs/monitors.yaml``) given before a main config that sets ``callbacks:`` was dropped
by it, in silence (jsonargparse applies the files in order)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from simclr_lightning.errors import SettingError


def config_files(args: list[str]) -> list[str]:
    """The ``--config`` (``-c``) files of a command line, in order."""
    files, rest = [], iter(args)
    for arg in rest:
        if arg in ("--config", "-c"):
            files.append(next(rest, ""))
        elif arg.startswith(("--config=", "-c=")):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_order(args: Any) -> None:
    """Refuse an overlay that appends to ``trainer.callbacks`` given before a config that sets
    them. Files that cannot be read are left to the parser, which names them."""
    args = sys.argv[1:] if args is None else args
    if not isinstance(args, list):
        return  # a dict of settings: no files in it
    appended = None
    for path in config_files(args):
        if not Path(path).is_file():  # a pipe (--config /dev/stdin) is the parser's to read once
            continue
        try:
            trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if not isinstance(trainer, dict):
            continue
        if "callbacks" in trainer and appended is not None:
            raise SettingError(
                f"--config {appended} appends to trainer.callbacks (callbacks+:), and --config "
                f"{path}, given after it, sets them anew, dropping what it added: give "
                f"--config {appended} after --config {path}"
            )
        if "callbacks+" in trainer:
            appended = path
