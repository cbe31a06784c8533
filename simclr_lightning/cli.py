"""The ``simclr-lightning`` command: Lightning's own CLI over this package's modules."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import simclr_lightning  # noqa: F401  (imports the classes so short names like SimCLR resolve)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """``fit``/``validate``/``test``/``predict`` with ``--config``; ``--model`` and ``--data``
    take any LightningModule / LightningDataModule class (``SimCLR``, ``CIFARDataModule`` ...).
    Returns the CLI so Python callers (and tests) can reach the trained model."""
    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args, run=run)


def main() -> None:
    """Console entry point (``simclr-lightning``, ``python -m simclr_lightning``)."""
    cli_main()
