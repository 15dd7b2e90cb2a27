"""Each flag is declared once, on its config field: the commands' options are exactly those fields.

For `refine-data annotate`, `refine-train`, `refine-train preview` and `refine-eval run`, every
option's default (as --help shows it) is the dataclass default, every flag field is an option, and
no option exists without a field except the command-only ones named here.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from refinevla.annotate import cli as data_cli
from refinevla.annotate.cli_options import Flag, cli_default, field_default, flag_fields, flag_of, option, options_from
from refinevla.annotate.part import AnnotateArgs
from refinevla.evaluate import cli as eval_cli
from refinevla.evaluate.config import DemosArgs, RunArgs
from refinevla.train import cli as train_cli
from refinevla.train.config import TrainConfig


def _commands() -> dict[str, Any]:
    """The click commands Typer builds (Typer may vendor click, so they are used by their attributes)."""
    data, train, run = get_command(data_cli.app), get_command(train_cli.app), get_command(eval_cli.app)
    return {
        "annotate": data.commands["annotate"],
        "train": train,  # the training command is the app's callback
        "preview": train.commands["preview"],
        "run": run.commands["run"],
        "demos": run.commands["demos"],
    }


# command -> (config, the fields it takes (None: every flag field), options it has without a field)
COMMANDS: dict[str, tuple[type, tuple[str, ...] | None, set[str]]] = {
    "annotate": (AnnotateArgs, None, set()),
    "train": (TrainConfig, None, {"config"}),
    "preview": (TrainConfig, train_cli.PREVIEW_FIELDS, {"n", "as_json"}),
    "run": (RunArgs, None, {"report"}),
    "demos": (DemosArgs, None, set()),
}


def _fields(config: type, only: tuple[str, ...] | None) -> list[dataclasses.Field[Any]]:
    return [f for f in flag_fields(config) if only is None or f.name in only]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_field_is_an_option_and_no_option_lacks_a_field(name: str) -> None:
    config, only, command_only = COMMANDS[name]
    params = {p.name for p in _commands()[name].params if p.name != "help"}
    fields = {f.name for f in _fields(config, only)}
    assert params - fields == command_only  # no option without a field but the declared command-only ones
    assert fields <= params  # no flag field forgotten


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_default_is_the_dataclass_default(name: str) -> None:
    config, only, _ = COMMANDS[name]
    params = {p.name: p for p in _commands()[name].params}
    optional = train_cli.FROM_CONFIG_FILE if name == "train" else ()
    for f in _fields(config, only):
        param, default, flag = params[f.name], field_default(f), flag_of(f)
        assert flag is not None
        if default is inspect.Parameter.empty:  # a required field
            if f.name in optional:  # `--config FILE.yaml` may give it instead
                assert not param.required and param.default is None, f.name
            else:
                assert param.required, f.name
            continue
        assert not param.required, f.name
        assert param.default == cli_default(f), f.name
        shown = flag.conversion.to_field(param.default) if flag.conversion else param.default
        assert shown == default, f.name


def test_flags_are_spelled_from_the_field_names_unless_declared_otherwise() -> None:
    for name, (config, only, _) in COMMANDS.items():
        params = {p.name: p for p in _commands()[name].params}
        for f in _fields(config, only):
            flag = flag_of(f)
            assert flag is not None
            param = params[f.name]
            if flag.argument:
                assert param.param_type_name == "argument", f.name
            elif flag.spelling is None:
                assert param.opts == ["--" + f.name.replace("_", "-")], (name, f.name)
    bf16 = next(p for p in _commands()["train"].params if p.name == "bf16")
    assert bf16.opts == ["--bf16"] and bf16.secondary_opts == ["--no-bf16"]


def test_fields_that_are_not_flags_stay_off_the_command_line() -> None:
    names = {f.name for f in dataclasses.fields(AnnotateArgs)} - {f.name for f in flag_fields(AnnotateArgs)}
    assert names == {"schema_id", "argv"}
    params = {p.name for p in _commands()["annotate"].params}
    assert not names & params


def test_annotate_hands_the_dataclass_defaults_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from refinevla.annotate.commands import annotate as command

    seen: list[AnnotateArgs] = []
    monkeypatch.setattr(command, "run_annotate", lambda args: seen.append(args) or 0)
    result = CliRunner().invoke(data_cli.app, ["annotate", "sample", "--frames", "4", "--camera", "a", "--camera", "b"])
    assert result.exit_code == 0, result.output
    (args,) = seen
    expected = AnnotateArgs(source="sample", frames=4, camera=["a", "b"], argv=args.argv)
    assert args == expected


def test_run_converts_on_off_and_comma_lists_to_the_fields_types(monkeypatch: pytest.MonkeyPatch) -> None:
    from refinevla.evaluate import runner

    seen: list[RunArgs] = []

    def fake_run_eval(args: RunArgs, progress: Any = None) -> runner.RunSummary:
        seen.append(args)
        return runner.RunSummary()

    monkeypatch.setattr(runner, "run_eval", fake_run_eval)
    base = ["run", "--policy", "ckpt", "--suite", "widowx", "--out", "res", "--no-report"]
    result = CliRunner().invoke(eval_cli.app, [*base, "--reasoning", "off", "--tasks", "a, b"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(eval_cli.app, base)
    assert result.exit_code == 0, result.output
    assert seen[0] == RunArgs(policy=Path("ckpt"), suite="widowx", out=Path("res"), reasoning=False, tasks=["a", "b"])
    assert seen[1] == RunArgs(policy=Path("ckpt"), suite="widowx", out=Path("res"))


def test_a_command_names_only_flag_fields() -> None:
    @dataclasses.dataclass
    class Config:
        size: int = option(1, "A size.")
        note: str = "not a flag"

    with pytest.raises(TypeError, match="note"):
        options_from(Config, only=("note",))
    assert flag_of(dataclasses.fields(Config)[0]) == Flag("A size.")
