"""The `hparray` command: `app` (the group, its context and the one error funnel), `commands`
(parse, call one core function), `export` (the same, for the trackers), `render` (rich tables).
No SQL and no statistics here."""

from hparray.cli import commands as _commands  # noqa: F401  (registers the commands on the group)
from hparray.cli import export as _export  # noqa: F401  (registers `hparray export` and its trackers)
from hparray.cli.app import cli, main

__all__ = ["cli", "main"]
