"""Command-line options derived from a config dataclass: each flag is declared once, on its field.

A config (`AnnotateArgs`, `TrainConfig`, `RunArgs`) is the documentation of its command: a field
declared with `option(default, "help")` is a flag, a plain field is not. `options_from(Config)`
gives a Typer command one option per flag field, named `--field-name`, with the field's default,
type and help, and hands the command the parsed values as one `dict` (field name -> value) to
build the config from. Nothing here imports an upper package, so `refine-data`, `refine-train` and
`refine-eval` all build their commands with it (schemas <- annotate <- train <- evaluate).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass
from typing import Annotated, Any, TypeVar, overload

import typer

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

METADATA_KEY = "refinevla.flag"  # where a field's `Flag` lives in `dataclasses.Field.metadata`
Flags = dict[str, Any]  # what a decorated command receives: field name -> value (already the field's type)


@dataclass(frozen=True)
class Conversion:
    """A field whose command-line form differs from its Python one (an on|off Enum for a bool, "a,b" for a list)."""

    cli_type: Any  # the type Typer parses (an Enum, `str | None`)
    to_field: Callable[[Any], Any]  # command-line value -> field value
    to_cli: Callable[[Any], Any]  # field value (the default) -> command-line value, as --help shows it


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line."""

    help: str  # the option's help text (the field's documentation)
    spelling: str | None = None  # e.g. "--bf16/--no-bf16", "--json", "--from"; default: --field-name
    argument: bool = False  # a positional argument instead of an option
    hidden: bool = False  # accepted but left out of --help
    conversion: Conversion | None = None  # the command line's type, when it is not the field's

    def decls(self, name: str) -> tuple[str, ...]:
        """Typer's parameter declarations for a field called `name`."""
        return () if self.argument else (self.spelling or "--" + name.replace("_", "-"),)

    def parameter_info(self, name: str) -> Any:
        """The `typer.Option` (or `typer.Argument`) that goes into the field's `Annotated` type."""
        if self.argument:
            return typer.Argument(help=self.help, hidden=self.hidden, show_default=False)
        return typer.Option(*self.decls(name), help=self.help, hidden=self.hidden)


@overload
def option(
    default: T,
    help: str | Flag,
    *,
    spelling: str | None = ...,
    argument: bool = ...,
    hidden: bool = ...,
    conversion: Conversion | None = ...,
) -> T: ...
@overload
def option(
    *,
    help: str | Flag,
    default_factory: Callable[[], T],
    spelling: str | None = ...,
    argument: bool = ...,
    hidden: bool = ...,
    conversion: Conversion | None = ...,
) -> T: ...
@overload
def option(
    *,
    help: str | Flag,
    spelling: str | None = ...,
    argument: bool = ...,
    hidden: bool = ...,
    conversion: Conversion | None = ...,
) -> Any: ...
def option(
    default: Any = MISSING,
    help: str | Flag = "",
    *,
    default_factory: Any = MISSING,
    spelling: str | None = None,
    argument: bool = False,
    hidden: bool = False,
    conversion: Conversion | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag; without a default it is required.

    `help` is the help text, or a `Flag` shared with commands that declare the option by hand
    (then the other keywords must stay unset).
    """
    if isinstance(help, Flag):
        if spelling is not None or argument or hidden or conversion is not None:
            raise TypeError("option(): give the extras in the shared Flag, not beside it")
        flag = help
    else:
        flag = Flag(help=help, spelling=spelling, argument=argument, hidden=hidden, conversion=conversion)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={METADATA_KEY: flag})


def flag_of(f: dataclasses.Field[Any]) -> Flag | None:
    """The field's `Flag`, or None for a field that is not on the command line."""
    flag = f.metadata.get(METADATA_KEY)
    return flag if isinstance(flag, Flag) else None


def flag_fields(config: type) -> list[dataclasses.Field[Any]]:
    """The config's fields that are flags, in declaration order."""
    return [f for f in dataclasses.fields(config) if flag_of(f) is not None]


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The field's default (a fresh one from `default_factory`); `inspect.Parameter.empty` when required."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def cli_default(f: dataclasses.Field[Any]) -> Any:
    """The field's default as the command line spells it (what --help shows)."""
    default, flag = field_default(f), flag_of(f)
    if default is inspect.Parameter.empty or flag is None or flag.conversion is None:
        return default
    return flag.conversion.to_cli(default)


def options_from(
    config: type,
    *,
    only: Collection[str] | None = None,
    optional: Collection[str] = (),
    into: str = "flags",
) -> Callable[[F], F]:
    """Decorate a Typer command: one option (or argument) per flag field of `config`.

    The command declares a parameter named `into` (type `Flags`); it is replaced, at its place in
    the signature, by the fields' options, and receives their values as a dict keyed by field name,
    converted to the fields' types. The command's other parameters (`ctx`, command-only options
    such as `--config` or `--json`) stay as they are. `only` picks a subset of the flag fields (in
    the config's order); `optional` names required fields this command lets the user leave out
    because another source (a `--config` file) may supply them: their option defaults to None.
    """
    fields = flag_fields(config)
    names = {f.name for f in fields}
    for name in [*(only or ()), *optional]:
        if name not in names:
            raise TypeError(f"{config.__name__}.{name} is not a flag field")
    if only is not None:
        fields = [f for f in fields if f.name in only]
    hints = typing.get_type_hints(config)

    def parameter(f: dataclasses.Field[Any]) -> inspect.Parameter:
        flag = flag_of(f)
        assert flag is not None  # flag_fields keeps only those
        kind = flag.conversion.cli_type if flag.conversion else hints[f.name]
        default = cli_default(f)
        if f.name in optional and default is inspect.Parameter.empty:
            kind, default = kind | None, None
        return inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[kind, flag.parameter_info(f.name)],
        )

    generated = [parameter(f) for f in fields]
    conversions = {f.name: flag.conversion for f in fields if (flag := flag_of(f)) and flag.conversion}

    def decorate(command: F) -> F:
        own = inspect.signature(command, eval_str=True)
        if into not in own.parameters:
            raise TypeError(f"{command.__name__} has no parameter {into!r} to receive the {config.__name__} flags")
        params: list[inspect.Parameter] = []
        for p in own.parameters.values():
            if p.name == into:
                params.extend(generated)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            flags = {f.name: kwargs.pop(f.name) for f in fields}
            for name, conversion in conversions.items():
                flags[name] = conversion.to_field(flags[name])
            return command(**kwargs, **{into: flags})

        # Typer reads the parameters from the signature; the annotations match it (Typer also reads those).
        wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return typing.cast(F, wrapper)

    return decorate


# Flags of every refine-data command that reads a source: `AnnotateArgs` declares its fields with
# them, and `cli.py` builds `inspect`'s and `stats`' options from the same ones.
SOURCE_FLAG = Flag("bridge | fractal | sample | rlds:PATH (TFDS builder dir) | lerobot:PATH_OR_REPO_ID", argument=True)
DATA_DIR_FLAG = Flag("Where the RLDS datasets live (default: $TFDS_DATA_DIR, ~/tensorflow_datasets); gs:// ok.")
SPLIT_FLAG = Flag("Dataset split.")
# the same flags as Typer's reusable Annotated types, for commands that declare their options by hand
DataDirOpt = Annotated[str | None, DATA_DIR_FLAG.parameter_info("data_dir")]
SplitOpt = Annotated[str, SPLIT_FLAG.parameter_info("split")]
CAMERA_FLAG = Flag("Camera feature(s) to read, primary first (e.g. image_1).")
INSTRUCTION_KEY_FLAG = Flag("Feature holding the instruction.")
STATE_KEY_FLAG = Flag("Feature(s) forming the state, comma-separated.")
ACTION_KEY_FLAG = Flag("Feature(s) forming the action, comma-separated.")
# `refine-data annotate` and `refine-eval run` join a Ray cluster the same way (annotate/ray_backend.connect)
RAY_ADDRESS_FLAG = Flag(
    "--backend ray: the cluster (HOST:PORT of the head, or auto); default: a private one on this machine."
)
