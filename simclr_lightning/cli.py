"""The ``simclr-lightning`` command: Lightning's own CLI over this package's modules, with the
settings that depend on the machine chosen for the machine it runs on."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import simclr_lightning  # noqa: F401  (imports the classes so short names like SimCLR resolve)
from simclr_lightning.callbacks import Preemption, RNGState
from simclr_lightning.callbacks.preemption import SIGTERM_EXIT_CODE
from simclr_lightning.checkpoint_io import check_ckpt_path, check_hpc_checkpoint
from simclr_lightning.cli_errors import lightning_setting, report
from simclr_lightning.command_checks import check_command, check_trainer_settings
from simclr_lightning.config_order import check_config_order
from simclr_lightning.errors import SettingError
from simclr_lightning.evaluation import LinearEval
from simclr_lightning.hardware import device_kind, forks, hardware_precision
from simclr_lightning.last_checkpoint import last_to_resume
from simclr_lightning.module import SimCLR
from simclr_lightning.parse_errors import OneLineErrorParser, class_of
from simclr_lightning.run_checks import check_launch

# Warnings a user of this command cannot act on (the library already chose for them).
QUIET = (
    r".*does not have many workers.*",  # data.num_workers follows the machine already
    r".*Found \d+ module\(s\) in eval mode.*",  # LinearEval keeps its frozen encoder in eval
    r".*isinstance\(treespec, LeafSpec\).*",  # inside Lightning, with torch >= 2.10
    # Lightning's strategy.all_gather, with torch >= 2.14: several times per rank per run
    r".*torch\.distributed\.nn\.functional\.all_gather is deprecated.*",
)
TIPS = "💡 Tip:"  # Lightning's advertisements for its cloud products


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIPS)


def plugin_list(plugins: Any) -> list:
    """``trainer.plugins`` as LightningCLI parsed it (None, one plugin, or a list) as a list."""
    if plugins is None:
        return []
    return plugins if isinstance(plugins, list) else [plugins]


def add_atomic_checkpoint_io(trainer_config) -> None:
    """Append :class:`AtomicCheckpointIO` to a LightningCLI ``trainer`` config's ``plugins``
    unless it already names a CheckpointIO (the user's own choice wins)."""
    plugins = plugin_list(trainer_config.get("plugins"))
    if any(_is_checkpoint_io(p) for p in plugins):
        return
    atomic = Namespace(
        class_path="simclr_lightning.checkpoint_io.AtomicCheckpointIO", init_args=Namespace()
    )
    trainer_config["plugins"] = [*plugins, atomic]


def _is_checkpoint_io(plugin: Any) -> bool:
    if isinstance(plugin, CheckpointIO):
        return True
    class_path = plugin.get("class_path") if hasattr(plugin, "get") else None
    cls = class_of(class_path) if isinstance(class_path, str) else None
    return cls is not None and issubclass(cls, CheckpointIO)


def with_plugin(plugins, class_path: str) -> list:
    """``trainer.plugins`` as parsed (None, one plugin, or a list) with ``class_path`` added."""
    return [*plugin_list(plugins), Namespace(class_path=class_path)]


def global_batchnorm(trainer: Namespace) -> None:
    """``trainer.sync_batchnorm: true`` becomes the GlobalBatchNorm plugin, which works on every
    backend; Lightning's own flag means torch's SyncBatchNorm, CUDA only, and Lightning refuses
    the flag together with another BatchNorm plugin."""
    if trainer.get("sync_batchnorm"):
        trainer.sync_batchnorm = False
        trainer.plugins = with_plugin(
            trainer.get("plugins"), "simclr_lightning.batchnorm.GlobalBatchNorm"
        )


# The Trainer's settings that take a number of batches (int) or a fraction (float). Trainer
# hints them Optional[Union[int, float]], but typing's cache hands out the equal
# Union[float, int, None] that lightning.fabric builds first, so jsonargparse read "1" as 1.0:
# --trainer.limit_val_batches 1 validated on every batch, not one. Declared int first here
# (``|`` unions are not cached), so "1" is one batch and "1.0" all of them, as in Python.
BATCH_LIMITS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
)


class SimCLRArgumentParser(OneLineErrorParser):
    """The CLI's parser: one-line errors, and the Trainer's batch limits read as ints."""

    def add_class_arguments(self, class_type, nested_key=None, *args, skip=None, **kwargs):
        if not (isinstance(class_type, type) and issubclass(class_type, Trainer)):
            return super().add_class_arguments(class_type, nested_key, *args, skip=skip, **kwargs)
        skip = set(skip or ()) | set(BATCH_LIMITS)
        added = super().add_class_arguments(class_type, nested_key, *args, skip=skip, **kwargs)
        group = self.groups.get(nested_key, self)  # listed with the other trainer settings
        for name in BATCH_LIMITS:
            key = f"{nested_key}.{name}" if nested_key else name
            stage = name.split("_")[1]
            help_text = (
                f"How much of the {stage} data to use: an int is a number of batches (1: one "
                f"batch), a float a fraction (1.0 or null: all)"
            )
            group.add_argument(f"--{key}", type=int | float | None, default=None, help=help_text)
            added.append(key)
        return added


class SimCLRCLI(LightningCLI):
    """LightningCLI that fills in the machine-dependent trainer settings a config leaves unset
    (null): ``trainer.precision`` (bf16-mixed on a CUDA GPU with bfloat16, 16-mixed on older
    GPUs, 32-true on CPU) and ``trainer.benchmark`` (cuDNN autotuning, on for CUDA). Each
    choice is said in the log; a value set in a config or on the command line is kept."""

    def parse_arguments(self, parser, args) -> None:
        check_config_order(args)  # an overlay before the config it adds to
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "") or self.config
        model = config.get("model")
        class_path = model.get("class_path") if hasattr(model, "get") else None
        fit = self.config.get("subcommand") == "fit"
        refuse_optimizer_override(config, class_path)
        check_ckpt_path(config.get("ckpt_path"), class_path, fit)
        # the model's settings as given, before LightningCLI puts a --ckpt_path file's over them
        self._given_model = explicit_model_settings(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        global_batchnorm(trainer)
        device = device_kind(trainer.get("accelerator", "auto"))
        if trainer.get("precision") is None:
            trainer.precision, why = hardware_precision(device, forks(trainer.get("strategy")))
            rank_zero_info(
                f"simclr-lightning: trainer.precision={trainer.precision} ({why}); "
                f"set --trainer.precision to choose"
            )
        if trainer.get("benchmark") is None and device == "cuda":
            trainer.benchmark = True
            rank_zero_info("simclr-lightning: trainer.benchmark=true (cuDNN autotuning on CUDA)")
        add_atomic_checkpoint_io(trainer)

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        check_command(self.subcommand, self.model, config.get("ckpt_path"), self.trainer.callbacks)
        if config.get("ckpt_path") == "hpc":
            check_hpc_checkpoint(self.trainer.default_root_dir)
        if config.get("ckpt_path") == "last":
            # found here, not by Lightning, so the model gives way to its settings as for a path
            found = last_to_resume(self.trainer)
            if found is None:
                return  # none: Lightning warns and starts afresh (or finds a remote one)
            config["ckpt_path"] = found
            rank_zero_info(f"simclr-lightning: --ckpt_path last is {found}, the newest run's")
            class_path = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
            saved = check_ckpt_path(found, class_path, self.subcommand == "fit")
            rebuilt = with_checkpoint_settings(self.model, saved)
            if rebuilt is not self.model:
                self.model = rebuilt  # and again the --optimizer/--lr_scheduler of the command
                self._add_configure_optimizers_method_to_model(self.subcommand)
        if config.get("ckpt_path"):
            say_checkpoint_settings(getattr(self, "_given_model", {}), self.model)

    before_validate = before_test = before_predict = before_fit

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        # The always-on callbacks (trainer_defaults) only where the config has none of their
        # kind: a second RNGState is refused by Lightning (one state key per stateful callback)
        # and a second Preemption would save every stop twice.
        given = config.get("callbacks") or []
        given = [*(given if isinstance(given, list) else [given]), *callbacks]
        defaults = self.trainer_defaults.get("callbacks", [])
        self.trainer_defaults["callbacks"] = [
            d for d in defaults if not any(isinstance(c, type(d)) for c in given)
        ]
        check_trainer_settings(config, self.subcommand)
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except ValueError as err:  # Lightning's check of its arguments: a setting to change
            if isinstance(err, SettingError):
                raise
            said = lightning_setting(err) or "trainer: " + " ".join(str(err).split())
            raise SettingError(said) from err
        finally:
            self.trainer_defaults["callbacks"] = defaults
        check_launch(trainer)  # torchrun's processes, a trainer of one
        return trainer


def refuse_optimizer_override(config, class_path: str | None) -> None:
    """LightningCLI's ``--optimizer`` replaces a model's ``configure_optimizers`` (and
    ``--lr_scheduler`` alone is dropped): for SimCLR and LinearEval that silently loses the
    learning-rate scaling, the warm-up and cosine schedule and the BatchNorm and bias
    exclusion from weight decay. A model of another package keeps LightningCLI's rule."""
    given = [k for k in ("optimizer", "lr_scheduler") if config.get(k) is not None]
    cls = class_of(class_path) if given else None
    own = next((c for c in (SimCLR, LinearEval) if cls is not None and issubclass(cls, c)), None)
    if own is not None:
        settings = (
            "model.optimizer (lars, sgd, adamw), model.base_lr (scaled by the global batch), "
            "model.warmup_epochs and model.final_lr_ratio"
            if own is SimCLR
            else "model.optimizer (sgd, lars), model.lr and model.lr_scaling"
        )
        raise SettingError(
            f"--{given[0]} is not used with {own.__name__}, which sets its own optimiser and "
            f"schedule: set {settings} (with model.weight_decay, model.momentum) instead "
            f"(simclr-lightning fit --model.help {own.__name__})"
        )


def explicit_model_settings(parser, args) -> dict[str, Any]:
    """The model arguments set by a config file or the command line, not left at their
    defaults: parsed once more without defaults, silently; when that cannot be done (a config
    piped in is read once), none."""
    parsers = [
        parser,
        *getattr(getattr(parser, "_subcommands_action", None), "choices", {}).values(),
    ]
    saved = [p.exit_on_error for p in parsers]
    try:
        for p in parsers:
            p.exit_on_error = False
        with contextlib.redirect_stderr(io.StringIO()):
            if isinstance(args, (dict, Namespace)):
                given = parser.parse_object(args, defaults=False)
            else:
                given = parser.parse_args(args, defaults=False)
    except (Exception, SystemExit):
        return {}
    finally:
        for p, exit_on_error in zip(parsers, saved, strict=True):
            p.exit_on_error = exit_on_error
    subcommand = given.get("subcommand")
    model = (given.get(subcommand) if subcommand else given).get("model")
    init_args = model.get("init_args") if hasattr(model, "get") else None
    return dict(vars(init_args)) if init_args is not None else {}


class ConfigToLoggers(SaveConfigCallback):
    """Saves ``config.yaml`` in the log directory (as LightningCLI does) and sends the whole
    run configuration (trainer, model, data, callbacks) to every logger's hyperparameters,
    under ``config``: W&B and TensorBoard then show what produced a run, not only the model's
    arguments."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


def with_checkpoint_settings(model: L.LightningModule, saved: dict[str, Any]) -> L.LightningModule:
    """``model`` built again with the settings its checkpoint records (``saved``), as
    LightningCLI builds it for a ``--ckpt_path`` file it is given (``last`` is found after the
    model is built: its architecture from the config failed to load the weights of another)."""
    current = {k: v for k, v in model.hparams.items() if not k.startswith("_")}  # init args
    settings = {k: v for k, v in saved.items() if k in current}
    if all(current[k] == v for k, v in settings.items()):
        return model
    return type(model)(**{**current, **settings})


# Not a setting a checkpoint replaces: LinearEval's pretraining file, whose encoder its own
# checkpoint holds (saved as None), so every test or predict of it would name it.
NOT_REPLACED = ("checkpoint",)


def say_checkpoint_settings(given: dict[str, Any], model: L.LightningModule) -> None:
    """Say which settings given for the model (:func:`explicit_model_settings`: a default the
    checkpoint differs from, such as LinearEval's ``cifar_stem`` read from the pretrained
    encoder, is no setting of the user's) its checkpoint's replaced (silently, before)."""
    used = dict(getattr(model, "hparams", {}))
    changed = [
        f"model.{k}={used[k]!r} (given {v!r})"
        for k, v in given.items()
        if k in used and used[k] != v and k not in NOT_REPLACED
    ]
    if changed:
        rank_zero_info(
            "simclr-lightning: the model is built with its checkpoint's settings: "
            + ", ".join(changed)
        )


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """``fit``/``validate``/``test``/``predict`` with ``--config``; ``--model`` and ``--data``
    take any LightningModule / LightningDataModule class (``SimCLR``, ``CIFARDataModule`` ...).
    Returns the CLI so Python callers (and tests) can reach the trained model."""
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    return SimCLRCLI(
        save_config_callback=ConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_class=SimCLRArgumentParser,
        # always on, after the config's callbacks: a stopped run saves its last step, and
        # checkpoints hold every rank's random state (exact resume)
        trainer_defaults={"callbacks": [Preemption(), RNGState()]},
        args=args,
        run=run,
    )


def main() -> None:
    """Console entry point (``simclr-lightning``, ``python -m simclr_lightning``): an error a
    user can fix is one line on stderr (exit 2 for a bad setting, 1 otherwise); a bug, or any
    error under ``SIMCLR_DEBUG=1``, keeps its traceback. A run stopped by SIGTERM (preemption)
    has saved its last step and exits 143: not a success, so schedulers requeue it."""
    try:
        cli_main()
    except SIGTERMException:  # stopped, checkpoint saved (Preemption)
        sys.exit(SIGTERM_EXIT_CODE)
    except Exception as err:
        code = report(err)
        if code is None:
            raise
        sys.exit(code)
