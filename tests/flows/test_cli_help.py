"""`--help` explains every option, and the defaults it names are the settings' defaults.

The CLI writes its help by hand (importing the settings models would make `--help` slow), so
this test is what keeps the two from drifting apart.
"""

from __future__ import annotations

import re
import typing

import pytest
import typer
from pydantic import BaseModel
from typer.main import get_command

from flows import cli
from flows.finetune import FinetuneFlowSettings
from flows.settings import PipelineSettings

# "(default X)" or "(default X: why)"; "X (default)" or "X (default: what X does)"
DEFAULT_AFTER = re.compile(r"\(default ([^):]+)[):]")
DEFAULT_BEFORE = re.compile(r"([\w.]+) \(default(\)|: )")
# "(default: the backbone's ...)", "(default: 80% of RAM ...)": computed, not a value
COMPUTED = re.compile(r"\(default: (the |\d+%)")


def _options(function) -> dict[str, typer.models.OptionInfo]:
    hints = typing.get_type_hints(function, include_extras=True)
    return {
        name: next(m for m in typing.get_args(hint)[1:] if isinstance(m, typer.models.OptionInfo))
        for name, hint in hints.items()
        if typing.get_origin(hint) is typing.Annotated
    }


def _named_default(help_text: str) -> str | None:
    if COMPUTED.search(help_text):
        return None
    after = DEFAULT_AFTER.search(help_text)
    if after:
        return after.group(1).strip()
    before = DEFAULT_BEFORE.search(help_text)
    return before.group(1) if before else None


def _as_flag(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _cases() -> list[tuple[str, type[BaseModel], str, str]]:
    pipeline = {
        name: next(m for m in typing.get_args(kind)[1:] if isinstance(m, typer.models.OptionInfo))
        for name, kind in cli.PIPELINE_OPTIONS.items()
    }
    cases = [("run", PipelineSettings, name, info.help) for name, info in pipeline.items()]
    cases += [
        ("finetune", FinetuneFlowSettings, name, info.help)
        for name, info in _options(cli.finetune).items()
    ]
    return cases


@pytest.mark.parametrize("command", ["run", "finetune", "classify", "predict", "sweep"])
def test_every_option_has_help(command: str) -> None:
    click_command = get_command(cli.app).commands[command]
    unexplained = [p.name for p in click_command.params if not getattr(p, "help", None)]
    assert unexplained == []


def test_defaults_named_in_help_are_the_settings_defaults() -> None:
    checked, wrong = 0, []
    for command, model, name, help_text in _cases():
        named = _named_default(help_text or "")
        if named is None or name not in model.model_fields:
            continue
        field = model.model_fields[name]
        actual = field.default_factory() if field.default_factory else field.default
        checked += 1
        if named != _as_flag(actual):
            flag = name.replace("_", "-")
            wrong.append(f"{command} --{flag}: help says {named!r}, settings {actual!r}")
    assert wrong == []
    assert checked >= 20  # the parser still finds the defaults the help names
