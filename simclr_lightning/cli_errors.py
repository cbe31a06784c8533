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

import errno
import os
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
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


def _own_message(exc: BaseException) -> tuple[str, int] | None:
    if isinstance(exc, ValueError) and LAUNCH_MISMATCH.fullmatch(str(exc)):
        said = re.sub(r"`(devices|num_nodes)=", r"`trainer.\1=", str(exc))
        return one_line(said.replace("`", "")), EXIT_USAGE
    if isinstance(exc, USAGE_ERRORS):
        said = missing_step_message(exc) or missing_data_message(exc)
        return one_line(said or worker_message(str(exc))), EXIT_USAGE
    if isinstance(exc, RUN_ERRORS) or (isinstance(exc, OSError) and exc.errno in USER_ERRNOS):
        return one_line(worker_message(str(exc))), EXIT_FAILURE
    return None


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
    print_error(message, prog)
    return code


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
    print(f"{where}: error: {message}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


# -- jsonargparse's parse errors -----------------------------------------------------------------
# The config file jsonargparse is reading: its YAML errors say only "<unicode string>".
READING: ContextVar[str | None] = ContextVar("READING", default=None)
# The base classes jsonargparse names when no class was given for a group (--model.x alone).
BASE_CLASS = re.compile(r"lightning(\.pytorch)?\.(LightningModule|LightningDataModule|Callback)")


def argument_message(message: str, err: BaseException | None) -> str:
    """jsonargparse's nested parse-error text as ``<setting>=<value> is invalid: ...``: the
    setting from the ``Parser key`` of each level, the reason from the innermost error."""
    chain = list(exception_chain(err))
    key, class_path = setting_of(message, err)
    leaf = one_line(str(chain[-1]) if chain else message)
    if (syntax := yaml_message(key, message, chain)) is not None:
        return syntax
    if found := re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", leaf):
        return f"{key or 'value'}={found.group(2)!r} is invalid: must be {_type(found.group(1))}"
    if found := re.fullmatch(r"Option '(.+)' is not accepted", leaf):
        owner = f" of {class_path}" if class_path else ""
        return f"{key}.{found.group(1)} is not a setting{owner}"
    if found := re.fullmatch(r"Expected a dot import path string: (.*)", leaf):
        return f"{key}={found.group(1)!r} is invalid: must be a class name or dotted import path"
    if found := re.fullmatch(r"(?:([\w.]+): )?the following arguments are required: (.+)", leaf):
        return required_message(found.group(1) or key, found.group(2).split(", "))
    return f"{key}: {leaf}" if key else leaf


SUBCOMMAND = re.compile(r"^(fit|validate|test|predict)\.")
REQUIRED = re.compile(r"^[\w.]+( and [\w.]+)* (is|are) required(: |$)")
WHOLE_GROUPS = {  # what to give when a config names no class for a whole group
    "model": "--model SimCLR, or a config that has one (--config configs/quickstart.yaml: "
    "every file in configs/ does)",
    "data": "--data ImageFolderDataModule --data.root DIR, or a config that has one "
    "(--config configs/quickstart.yaml)",
}


def required_message(group: str, names: list[str]) -> str:
    """jsonargparse's "the following arguments are required: fit.model" (or "data: ...:
    root") as the settings a user must give, and for a whole group what to give."""
    settings = [SUBCOMMAND.sub("", f"{group}.{name}" if group else name) for name in names]
    if len(settings) == 1 and settings[0] in WHOLE_GROUPS:
        return f"{settings[0]} is required: give {WHOLE_GROUPS[settings[0]]}"
    verb = "is" if len(settings) == 1 else "are"
    return f"{' and '.join(settings)} {verb} required"


def setting_of(message: str, err: BaseException | None) -> tuple[str, str | None]:
    """The dotted setting a parse error is about (``model.temperature``), from the ``Parser
    key`` of each level, and the class given for it (``simclr_lightning.SimCLR``), if any."""
    texts = [message] + [str(e) for e in exception_chain(err)]
    keys: list[str] = []
    for text in texts:
        found = re.match(r'\s*Parser key "([^"]+)"', text)
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
    class_path = next(
        (m.group(1) for t in texts if (m := re.search(r"given class_path '([^']+)'", t))), None
    )
    return ".".join(keys), class_path


def yaml_message(key: str, message: str, chain: list[BaseException]) -> str | None:
    """A YAML syntax error as the file and line to fix: PyYAML names ``"<unicode string>"``,
    since jsonargparse hands it the file's text. The file is the ``--config`` being read, or
    the one jsonargparse names for a group's file (``--model model.yaml``)."""
    error = next((e for e in chain if isinstance(e, yaml.YAMLError)), None)
    if error is None:
        return None
    texts = [message] + [str(e) for e in chain]
    named = next(
        (
            m.group(1) or m.group(2)
            for t in texts
            if (m := re.search(r"sub-config file (.+?): |Unable to load config '([^']+)'", t))
        ),
        None,
    )
    path = named or READING.get()
    if path is None:  # a value on the command line
        what = key or "value"
    else:
        what = f"{key.split('.')[0]} config file {path}" if named and key else f"config file {path}"
    problem = getattr(error, "problem_mark", None)
    if problem is None:
        return f"{what} is not valid YAML: {one_line(str(error))}"
    where, detail = problem, error.problem
    if error.context_mark is not None:  # where the construct to fix began (an unclosed "[")
        where = error.context_mark
        detail = f"{error.context}, {detail} at {_at(problem)}"
    return f"{what} is not valid YAML, {_at(where)}: {detail}"


def _at(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def settings_help(parser, key: str, class_path: str | None) -> str:
    """The command that lists the settings of ``key``'s group: a class group's (``model``,
    ``data``, ``trainer.callbacks``) are shown by ``--model.help SimCLR``, not ``--help``."""
    command = " ".join([PROG, *parser.prog.replace(" [options]", "").split()[1:]])
    parts = key.split(".")
    actions = getattr(parser, "_option_string_actions", {})
    group = next(
        (
            ".".join(parts[:n])
            for n in range(len(parts), 0, -1)
            if f"--{'.'.join(parts[:n])}.help" in actions
        ),
        None,
    )
    if group is None:
        return f"{command} --help"
    if class_path is None or BASE_CLASS.fullmatch(class_path):
        return f"{command} --{group}.help CLASS_PATH_OR_NAME"
    name = class_path.removeprefix("simclr_lightning.")
    return f"{command} --{group}.help {name if '.' not in name else class_path}"


def _type(text: str) -> str:
    text = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)
    if found := re.fullmatch(r"typing\.Literal\[(.*)\]", text):
        return f"one of {found.group(1)}"
    return text


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, printing a parse error as one line (and exit code 2, as before)
    instead of the usage text and jsonargparse's nested union report."""

    def parse_path(self, path, *args, **kwargs):
        """Remembers the file being read: its YAML errors name only ``"<unicode string>"``."""
        token = READING.set(str(path))
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            READING.reset(token)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        text = argument_message(message, ex)
        named = REQUIRED.search(text) is not None  # the setting to give: no pointer needed
        if not named and not any(isinstance(e, yaml.YAMLError) for e in exception_chain(ex)):
            text = f"{text} (settings: {settings_help(parser, *setting_of(message, ex))})"
        print_error(text)
        sys.exit(EXIT_USAGE)
