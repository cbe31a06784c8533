"""One line on stderr for every error a user can fix, instead of the 70-80 lines of chained
tracebacks jsonargparse and Lightning print around it.

The real message is found by walking the chain of ``raise ... from`` causes: jsonargparse wraps
an error raised in a class's ``__init__`` in a union-validation ``ValueError`` whose text ends
with the whole parsed ``Namespace``. An error raised *while handling* another (``__context__``
only) is a new failure, not a wrapper: it decides, so a bug in a failure path keeps its
traceback instead of hiding behind the user error it was handling. Exit codes: 2 for usage
errors (a bad setting or argument), 1 for the others (missing or corrupt data, an unusable
checkpoint, a NaN loss, a full disk or a folder that cannot be written). ``SIMCLR_DEBUG=1``
keeps the full traceback. Anything else is a bug and keeps its traceback too."""

from __future__ import annotations

import difflib
import errno
import os
import re
import sys
from collections.abc import Iterator

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from simclr_lightning.errors import CheckpointError, CorruptImageError, DataFileError, SettingError

EXIT_USAGE = 2
EXIT_FAILURE = 1
USAGE_ERRORS: tuple[type[BaseException], ...] = (SettingError, MisconfigurationException)
RUN_ERRORS: tuple[type[BaseException], ...] = (
    CorruptImageError,
    CheckpointError,
    DataFileError,
    FloatingPointError,  # SimCLR.training_step's non-finite loss
    FileNotFoundError,
)
# Errors of the machine a user fixes (a full disk, a folder they cannot write); an OSError
# with another errno may be a bug and keeps its traceback.
USER_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC,
     errno.EDQUOT, errno.EROFS, errno.EEXIST, errno.ENAMETOOLONG}
)  # fmt: skip
PROG = "simclr-lightning"


def debug() -> bool:
    """``SIMCLR_DEBUG=1``: print the full traceback of every error."""
    return os.environ.get("SIMCLR_DEBUG", "") not in ("", "0")


def exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised ``from``, outermost first."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__


def user_error(err: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code for an error a user can fix; None for a bug. A user
    error raised while handling another names that one too (a full disk while saving the
    checkpoint of a run stopped by a corrupt image)."""
    chain = list(exception_chain(err))
    found = next((own for exc in chain if (own := _own_message(exc)) is not None), None)
    if found is None:
        return None
    message, code = found
    handled = next(
        (e.__context__ for e in chain if e.__context__ is not None and not e.__suppress_context__),
        None,
    )
    earlier = user_error(handled) if handled is not None else None
    if earlier is not None and earlier[0] != message:
        message = f"{message} (raised while handling: {earlier[0]})"
    return message, code


# Lightning's check of trainer.devices / num_nodes against the launcher (SLURM, torchrun)
LAUNCH_MISMATCH = re.compile(r"You set `(devices|num_nodes)=.* does not match.*", re.S)
# Lightning's errors of a setting that are not ValueErrors: trainer.devices of the wrong kind,
# an EarlyStopping monitoring a metric nothing logged (at the first validation's end)
LIGHTNING_SETTING = re.compile(
    r"`devices` selected with `\w+` should be .*|Early stopping conditioned on metric .*", re.S
)

# Lightning's check, in Trainer.__init__ (before any data is read), that no two stateful
# callbacks share a state_key: most often a config's callback given again on the command line
DUPLICATE_CALLBACK = re.compile(r"Found more than one stateful callback of type `(\w+)`\..*", re.S)


def _own_message(exc: BaseException) -> tuple[str, int] | None:
    if isinstance(exc, RuntimeError) and (twice := DUPLICATE_CALLBACK.fullmatch(str(exc))):
        return (
            f"trainer.callbacks: two {twice[1]} callbacks have the same state key, under which "
            f"a checkpoint keeps one state (one given in a config and again with "
            f"--trainer.callbacks+=?): give it once, or make their state keys differ (for "
            f"ModelCheckpoint its monitor, mode, every_n_train_steps, every_n_epochs or "
            f"train_time_interval)"
        ), EXIT_USAGE
    if isinstance(exc, ValueError) and LAUNCH_MISMATCH.fullmatch(str(exc)):
        said = re.sub(r"`(devices|num_nodes)=", r"`trainer.\1=", str(exc))
        return one_line(said.replace("`", "")), EXIT_USAGE
    if isinstance(exc, (TypeError, RuntimeError)) and LIGHTNING_SETTING.fullmatch(str(exc)):
        said = str(exc).replace("`devices`", "trainer.devices").replace("`", "")
        return one_line(said), EXIT_USAGE
    if isinstance(exc, ValueError) and (said := list_item_error(str(exc))) is not None:
        return said, EXIT_USAGE
    if isinstance(exc, ModuleNotFoundError) and (need := MISSING_PACKAGE.match(str(exc))):
        return (
            f"{refusing_part(exc)}needs {need[1]}, which is not installed here: "
            f"pip install '{need[1]}', or choose another"
        ), EXIT_FAILURE
    if isinstance(exc, USAGE_ERRORS):
        said = missing_step_message(exc) or missing_data_message(exc) or lightning_setting(exc)
        where = "" if isinstance(exc, SettingError) else refusing_part(exc)  # or logger
        return where + one_line(said or worker_message(str(exc))), EXIT_USAGE
    if isinstance(exc, RUN_ERRORS) or (isinstance(exc, OSError) and exc.errno in USER_ERRNOS):
        return one_line(worker_message(str(exc))), EXIT_FAILURE
    return None


# lightning_utilities' RequirementCache, raised by a logger or accelerator whose package is not
# installed (MLFlowLogger's mlflow, the tpu accelerator's torch_xla)
MISSING_PACKAGE = re.compile(r"Requirement '([^']+)' not met")
BAD_STRATEGY = re.compile(r"You selected an invalid strategy name: `strategy='([^']*)'`.*", re.S)


def lightning_setting(exc: BaseException) -> str | None:
    """Lightning's messages of a trainer setting that name neither it nor what is allowed:
    ``No supported gpu backend found!`` (``trainer.accelerator gpu`` on a machine without
    one, running a GPU recipe on a laptop) and an unknown strategy, "a string or a Strategy"
    though it is a string, with a list cut short."""
    text = str(exc).strip()
    if text == "No supported gpu backend found!":
        return (
            "trainer.accelerator='gpu' is invalid on this machine, which has no CUDA or MPS "
            "device: use --trainer.accelerator cpu, or auto (a GPU where there is one)"
        )
    if bad := BAD_STRATEGY.fullmatch(text):
        from lightning.pytorch.strategies import StrategyRegistry

        names = sorted(StrategyRegistry.available_strategies())
        close = difflib.get_close_matches(bad[1], names, n=1)
        guess = f"did you mean {close[0]}? " if close else ""
        main = [n for n in names if "find_unused" not in n and "offload" not in n]
        return (
            f"trainer.strategy={bad[1]!r} is invalid: {guess}give auto, {', '.join(main)} "
            f"(or their _find_unused_parameters_true, _offload variants), or a Strategy class"
        )
    return None


def refusing_part(exc: BaseException) -> str:
    """``trainer.callbacks (EarlyStopping): `` (or ``trainer.logger (WandbLogger): ``,
    ``trainer.accelerator (XLAAccelerator): ``) where a callback's, logger's or accelerator's
    ``__init__`` refused its arguments with a bare message (`` `mode` can be min, max, got
    maximum``), which names neither; empty otherwise."""
    from lightning.fabric.accelerators import Accelerator
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import Logger

    settings = {Callback: "trainer.callbacks", Logger: "trainer.logger"}
    settings[Accelerator] = "trainer.accelerator"

    owner, tb = "", exc.__traceback__
    while tb is not None:
        frame, made = tb.tb_frame, tb.tb_frame.f_locals.get("self")
        kind = next((k for k in settings if isinstance(made, k)), None)
        if frame.f_code.co_name == "__init__" and kind is not None:
            owner = f"{settings[kind]} ({type(made).__name__}): "
        tb = tb.tb_next
    return owner


def worker_message(text: str) -> str:
    """The error's own message from the text torch re-raises a DataLoader worker's error with
    (``Caught <type> in DataLoader worker process <n>. Original Traceback ...``): the lines
    after the last frame of the traceback, less the ``module.Type: `` they start with."""
    if not re.match(r"Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Trace", text):
        return text
    lines = text.rstrip().splitlines()
    last_frame = max(
        (i for i, line in enumerate(lines) if line[:1].isspace() or not line), default=0
    )
    own = "\n".join(lines[last_frame + 1 :])
    return re.sub(r"^[\w.]+: ", "", own, count=1) or text


def report(err: BaseException, prog: str = PROG) -> int | None:
    """Print ``err``'s one line on stderr as ``<prog>: error: ...`` and return the exit code;
    None (print nothing) for a bug or under ``SIMCLR_DEBUG=1``, where the caller re-raises for
    the traceback."""
    found = None if debug() else user_error(err)
    if found is None:
        return None
    message, code = found
    end_progress_bars()
    print_error(message, prog)
    return code


def end_progress_bars() -> None:
    """Closes the progress bars an error stopped mid-line: their last ``\\r`` update has no
    newline, and on a terminal the error would be printed at the end of the bar's line."""
    tqdm = sys.modules.get("tqdm")  # imported by Lightning's progress bar, if it ran
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    sys.stdout.flush()


# -- a command the model has no step for ---------------------------------------------------------
NO_STEP = re.compile(r"No `(\w+)\(\)` method defined to run `Trainer\.(\w+)`\.?")


def missing_step_message(exc: BaseException) -> str | None:
    """Lightning's bare ``No `test_step()` method defined`` as what to run instead: ``test`` of
    a SimCLR checkpoint is the usual way to get there, and pretraining has no test step (its
    encoder is measured by linear evaluation, or by the kNN monitor under ``validate``). The
    commands are README's, with the run's own checkpoint and configs where they can be read."""
    found = NO_STEP.fullmatch(str(exc).strip())
    if found is None:
        return None
    step, command = found.groups()
    cli = _running_cli(exc)
    model = getattr(cli, "model", None)  # None: not found, most likely SimCLR (the only one)
    pretraining = model is None or any(
        c.__name__ == "SimCLR" and c.__module__.startswith("simclr_lightning")
        for c in type(model).__mro__
    )
    if not pretraining or step != "test_step":
        name = f"model {type(model).__qualname__}" if model is not None else "the model"
        return f"{name} has no {step}() method, which {PROG} {command} runs"
    config = cli.config.get(command, cli.config) if cli is not None else {}
    ckpt = config.get("ckpt_path") or "CKPT"
    configs = [str(c) for c in config.get("config") or [] if c is not None] or ["CONFIG"]
    given = " ".join(f"--config {c}" for c in configs)
    return (
        f"a SimCLR (pretraining) model has no test step for {PROG} test: measure its encoder "
        f"by linear evaluation: {PROG} fit --config configs/linear_eval.yaml --model.checkpoint "
        f"{ckpt}, then {PROG} test --config configs/linear_eval.yaml --ckpt_path LINEAR_CKPT "
        f"(the bundled sample: configs/quickstart_eval.yaml), or by its kNN accuracy: {PROG} "
        f"validate {given} --config configs/monitors.yaml --ckpt_path {ckpt}"
    )


def missing_data_message(exc: BaseException) -> str | None:
    """Lightning's "`train_dataloader` must be implemented" of a run given a model and no
    data (``fit --model SimCLR``) as the setting to give."""
    if re.fullmatch(r"`(train|val|test|predict)_dataloader` must be implemented.*", str(exc)):
        return f"data is required: give {WHOLE_GROUPS['data']}"
    return None


def _running_cli(exc: BaseException) -> LightningCLI | None:
    """The LightningCLI whose subcommand raised ``exc``: the ``self`` of a frame it passed."""
    tb = exc.__traceback__
    while tb is not None:
        if isinstance(owner := tb.tb_frame.f_locals.get("self"), LightningCLI):
            return owner
        tb = tb.tb_next
    return None


def print_error(message: str, prog: str = PROG) -> None:
    rank = getattr(rank_zero_only, "rank", 0) or 0
    where = f"{prog} [rank {rank}]" if rank else prog
    sys.stderr.write(f"{where}: error: {message}\n")  # one write: ranks do not interleave
    sys.stderr.flush()


# jsonargparse's error for a list given to a union setting (trainer.logger: a Logger, a list of
# them, true/false or null): one error per type tried, in the order of the types
LIST_FOR_UNION = re.compile(
    r"Does not validate against any of the Union subtypes\s*Subtypes: \[(?P<types>.*?)\]\s*"
    r"Errors:\n(?P<errors>.*?)\nGiven value type: <class 'list'>",
    re.S,
)


def list_item_error(text: str) -> str | None:
    """The error of the list's own type (``Iterable[Logger]``) in jsonargparse's report of a
    list for ``trainer.logger``: the logger's own refusal (WandbLogger's ``offline`` with
    ``log_model``), otherwise 70 lines of every type tried with the list printed whole."""
    found = LIST_FOR_UNION.search(text)
    if found is None:
        return None
    types = top_level_parts(found["types"])
    errors = re.split(r"^  - ", found["errors"], flags=re.M)[1:]
    listed = [i for i, kind in enumerate(types) if kind.startswith("collections.abc.Iterable[")]
    if len(errors) != len(types) or not listed or "Logger" not in types[listed[0]]:
        return None
    classes = {name.rpartition(".")[2] for name in re.findall(r"class_path='([\w.]+)'", text)}
    owner = f" ({classes.pop()})" if len(classes) == 1 else ""
    return f"trainer.logger{owner}: {one_line(errors[listed[0]])}"


def top_level_parts(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: the types of jsonargparse's
    ``Subtypes: [...]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[<") - (char in "]>")
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


# What to give when a config names no class for a whole group (a parse error or a run).
WHOLE_GROUPS = {
    "model": "--model SimCLR, or a config that has one (--config configs/quickstart.yaml: "
    "every main config in configs/ does; monitors.yaml and the like add to one)",
    "data": "--data ImageFolderDataModule --data.root DIR, or a config that has one "
    "(--config configs/quickstart.yaml)",
}
