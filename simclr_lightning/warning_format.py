"""This package's warnings printed with their class (``CorruptImageWarning: ...``): Lightning
formats every warning from a path containing "lightning" (``simclr_lightning`` included) as
its own, without the class a user filters by (``-W ignore::...``)."""

from __future__ import annotations

import warnings
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def install() -> None:
    """Wrap the warning formatter in place (Lightning's, set when it is imported): a warning
    raised in this package keeps Lightning's one line, with its class."""
    current = warnings.formatwarning
    if getattr(current, "_simclr_lightning", False):
        return

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if PACKAGE in Path(filename).resolve().parents:
            return f"{filename}:{lineno}: {category.__name__}: {message}\n"
        return current(message, category, filename, lineno, line)

    formatwarning._simclr_lightning = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning
