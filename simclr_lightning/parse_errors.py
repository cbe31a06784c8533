"""jsonargparse's parse errors (a setting that does not exist, a value of the wrong type, a
YAML syntax error) as one line naming the setting and what is allowed, instead of the usage
text and the nested union report: the parser LightningCLI builds for ``simclr-lightning``."""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from contextvars import ContextVar

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from simclr_lightning.cli_errors import (
    EXIT_USAGE,
    PROG,
    WHOLE_GROUPS,
    debug,
    exception_chain,
    one_line,
    print_error,
    top_level_parts,
)
from simclr_lightning.loading import class_of

# The config file jsonargparse is reading: its YAML errors say only "<unicode string>".
READING: ContextVar[str | None] = ContextVar("READING", default=None)
# The command line being parsed.
GIVEN: ContextVar[list[str] | None] = ContextVar("GIVEN", default=None)
# The base classes jsonargparse names when no class was given for a group (--model.x alone).
BASE_CLASS = re.compile(r"lightning(\.pytorch)?\.(LightningModule|LightningDataModule|Callback)")


def argument_message(message: str, err: BaseException | None) -> str:
    """jsonargparse's nested parse-error text as ``<setting>=<value> is invalid: ...``: the
    setting from the ``Parser key`` of each level, the reason from the innermost error."""
    chain = list(exception_chain(err))
    key, class_path = setting_of(message, err)
    if not key and (named := re.match(r"--([\w.]+): ", message)):  # --model.help CLASS
        key = named.group(1)
    leaf = one_line(str(chain[-1]) if chain else message)
    if (syntax := yaml_message(key, message, chain)) is not None:
        return syntax
    if found := re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", leaf):
        allowed = union_types(chain) or _type(found.group(1))  # the union's, not its last type
        return f"{key or 'value'}={found.group(2)!r} is invalid: must be {allowed}"
    if found := re.fullmatch(r"Option '(.+)' is not accepted", leaf):
        if class_path and BASE_CLASS.fullmatch(class_path):  # --model.x before --model/--config
            return (
                f"{key}.{found.group(1)} is given before any {key} class: give --{key} CLASS, "
                f"or the --config that names one, before the {key}'s settings"
            )
        owner = f" of {class_path}" if class_path else ""
        return f"{key}.{found.group(1)} is not a setting{owner}"
    if found := re.fullmatch(r"module '([\w.]+)' has no attribute '(\w+)'", leaf):
        module, name = found.groups()
        also = close_class(name, module)
        return f"{key}={module}.{name} is not a class: {module} has no {name}{also}"
    if found := re.fullmatch(r"(Group|Subcommand) '([\w.]+)' does not accept option '(.+)'", leaf):
        group = f"{found.group(2)}." if found.group(1) == "Group" else ""  # a config file's key
        return f"{group}{found.group(3)} is not a setting"
    if (found := re.fullmatch(r"unrecognized arguments: --([\w.]+)(=.*|\s.*)?", leaf)) and (
        " --" not in (found.group(2) or "")  # one unknown option (and its value)
    ):
        setting = f"{key}.{found.group(1)}" if key else found.group(1)
        return f"{setting} is not a setting" + (f" of {class_path}" if class_path else "")
    if found := re.fullmatch(r"Expected a dot import path string: (.*)", leaf):
        also = close_class(found.group(1), *CLASS_MODULES.get(key or "", ["simclr_lightning"]))
        return (
            f"{key}={found.group(1)!r} is invalid: must be a class name or dotted import path{also}"
        )
    if found := re.fullmatch(r"(?:([\w.]+): )?the following arguments are required: (.+)", leaf):
        return required_message(found.group(1) or key, found.group(2).split(", "))
    return f"{key}: {leaf}" if key else leaf


SUBCOMMAND = re.compile(r"^(fit|validate|test|predict)\.")
REQUIRED = re.compile(r"^[\w.]+( and [\w.]+)* (is|are) required(: |$)")


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
    if class_path is None or BASE_CLASS.fullmatch(class_path) or class_of(class_path) is None:
        return f"{command} --{group}.help CLASS_PATH_OR_NAME"
    name = class_path.removeprefix("simclr_lightning.")
    return f"{command} --{group}.help {name if '.' not in name else class_path}"


# Where LightningCLI finds the short class names of a setting (CSVLogger, EarlyStopping)
CLASS_MODULES = {
    "trainer.logger": ["lightning.pytorch.loggers"],
    "trainer.callbacks": ["simclr_lightning", "lightning.pytorch.callbacks"],
}


def close_class(name: str, *modules: str) -> str:
    """``: did you mean ImageFolderDataModule?`` for a misspelt class of ``modules``, or ""."""
    names = [n for m in modules for n in dir(sys.modules.get(m)) if n[:1].isupper()]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.85)
    return f": did you mean {close[0]}?" if close else ""


NOT_A_SETTING = re.compile(r"([\w.]+) is not a setting(?: of ([\w.]+))?")


def close_setting(text: str, parser, key: str) -> str | None:
    """The setting a misspelt one was most likely meant to be (``trainer.max_epoch``:
    ``trainer.max_epochs``): among the parser's options in the same group, or the arguments
    of the class given for ``key`` (``model``, ``trainer.callbacks``)."""
    found = NOT_A_SETTING.match(text)
    if found is None:
        return None
    setting, class_path = found.groups()
    if class_path is None:
        group, _, option = setting.rpartition(".")
        options = getattr(parser, "_option_string_actions", {})
        names = [o[2:] for o in options if o.startswith("--") and not o.endswith(".help")]
        names = [n.rpartition(".")[2] for n in names if n.rpartition(".")[0] == group]
        rest = ""
    elif setting.startswith(f"{key}."):  # data.augmentaton.scale: the class's augmentation
        group = key
        option, dot, rest = setting[len(key) + 1 :].partition(".")
        names = init_arguments(class_path)
        rest = dot + rest
        if option in names:  # a nested setting's own arguments are not looked up
            return None
    else:
        return None
    close = difflib.get_close_matches(option, names, n=1, cutoff=0.75)
    if not close:
        return None
    return f"{group}.{close[0]}{rest}" if group else close[0] + rest


def init_arguments(class_path: str) -> list[str]:
    """The arguments jsonargparse reads for a class: its ``__init__``'s, and its bases' while
    each passes ``**kwargs`` on."""
    cls = class_of(class_path)
    names: list[str] = []
    for klass in cls.__mro__ if cls is not None else ():
        if "__init__" not in vars(klass):
            continue
        try:
            params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())
        except (TypeError, ValueError):
            break
        names += [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


UNION = re.compile(
    r"Does not validate against any of the Union subtypes\s*Subtypes: \[(.*?)\]\s*Errors:", re.S
)


def union_types(chain: list[BaseException]) -> str | None:
    """What a union setting allows (``trainer.precision``: its literals and null), from
    jsonargparse's ``Subtypes: [...]``: the innermost error names only the last type tried."""
    for error in reversed(chain):  # the innermost: outer ones are a group's class (model)
        if (found := UNION.search(str(error))) and (allowed := _union(found.group(1))):
            return allowed
    return None


def _union(text: str) -> str | None:
    """A union's ``Subtypes`` text as what a user may give, or None for a union of classes."""
    kinds, values, seen = [], [], set()
    for part in map(_type, top_level_parts(text)):
        if part.startswith("one of "):
            for value in part.removeprefix("one of ").split(", "):
                if value.strip("'") not in seen:  # '32' after 32: the same to a user
                    seen.add(value.strip("'"))
                    values.append(value)
        else:
            kinds.append("null" if part == "NoneType" else part)
    if any("." in kind for kind in kinds):  # a class (data, model): not a plain value
        return None
    allowed = ([f"one of {', '.join(values)}"] if values else []) + kinds
    return f"{', '.join(allowed[:-1])} or {allowed[-1]}" if len(allowed) > 1 else allowed[0]


def _type(text: str) -> str:
    text = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)
    if found := re.fullmatch(r"typing\.Literal\[(.*)\]", text):
        return f"one of {found.group(1)}"
    return text


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, printing a parse error as one line (and exit code 2, as before)
    instead of the usage text and jsonargparse's nested union report. Abbreviated options
    are refused (``--trainer.max_epoch`` is a misspelling to name, not ``max_epochs``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, *rest, **kwargs):
        """Remembers the command line: an error in a config file is raised by the top-level
        parser, and the subcommand's parser knows the settings to suggest."""
        token = GIVEN.set(list(sys.argv[1:] if args is None else args))
        try:
            return super().parse_args(args, *rest, **kwargs)
        finally:
            GIVEN.reset(token)

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
        parser = getattr(ex, "subcommand_parser", None) or self._given_subcommand() or self
        text = argument_message(message, ex)
        key, class_path = setting_of(message, ex)
        named = REQUIRED.search(text) is not None  # the setting to give: no pointer needed
        if (close := close_setting(text, parser, key)) is not None:
            text = f"{text}: did you mean {close}?"
        if not named and not any(isinstance(e, yaml.YAMLError) for e in exception_chain(ex)):
            text = f"{text} (settings: {settings_help(parser, key, class_path)})"
        print_error(text)
        sys.exit(EXIT_USAGE)

    def _given_subcommand(self) -> LightningArgumentParser | None:
        """The parser of the subcommand on the command line (``fit``), if this parser has it."""
        action = getattr(self, "_subcommands_action", None)
        parsers = getattr(action, "_name_parser_map", {})
        return next((parsers[arg] for arg in GIVEN.get() or [] if arg in parsers), None)
