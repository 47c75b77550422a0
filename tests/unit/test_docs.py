"""The documentation keeps up with the command (as sqlite-utils' test_docs does): every command
and every option `hparray --help` lists appears in README.md or docs/."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from hparray.cli import cli

REPO = Path(__file__).resolve().parents[2]
DOCS = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])


def _options(command: click.Command) -> list[str]:
    return [name for param in command.params if isinstance(param, click.Option)
            for name in param.opts if name.startswith("--") and name != "--help"]


COMMANDS = sorted(cli.commands)
OPTIONS = sorted({(name, option) for name, command in cli.commands.items() for option in _options(command)})


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_documented(name: str) -> None:
    assert f"hparray {name}" in DOCS, f"`hparray {name}` is in --help but not in README.md or docs/"


@pytest.mark.parametrize("command, option", OPTIONS)
def test_every_option_is_documented(command: str, option: str) -> None:
    assert option in DOCS, f"`hparray {command} {option}` is in --help but not in README.md or docs/"


@pytest.mark.parametrize("option", _options(cli))
def test_every_global_option_is_documented(option: str) -> None:
    assert option in DOCS, f"the global option {option} is in --help but not in README.md or docs/"
