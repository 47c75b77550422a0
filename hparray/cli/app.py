"""The `hparray` group, the context every command shares, and the one error funnel (`main`):
every HparrayError becomes one line and an exit code (2: bad input, 1: runtime failure, 3: a
worker that stopped on purpose); the traceback only with --verbose."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from hparray.config import Settings, SweepConfig, load_settings, load_sweep
from hparray.errors import HparrayError
from hparray.metrics import METRICS
from hparray.store import Store

# Tables stay readable in logs and pipes, where rich would otherwise assume 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


@dataclass
class Context:
    db: str | None
    config_dir: Path
    verbose: bool
    metrics: tuple[str, ...] | None = None

    def sweep(self) -> SweepConfig:
        sweep = load_sweep(self.config_dir)
        return dataclasses.replace(sweep, settings=self._override(sweep.settings))

    def settings(self) -> Settings:
        return self._override(load_settings(self.config_dir))

    def _override(self, settings: Settings) -> Settings:
        return settings if self.metrics is None else settings.model_copy(update={"metrics": self.metrics})

    def global_args(self, store: Store) -> list[str]:
        """The options a worker process needs to see the same sweep as this command."""
        return ["--config-dir", str(self.config_dir.resolve()), "--db", store.url,
                *(["--metrics", ",".join(self.metrics)] if self.metrics else []),
                *(["--verbose"] if self.verbose else [])]

    def store(self, create: bool = True) -> Store:
        return Store.open(self.db, create=create)


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--db", envvar="HPARRAY_DB", metavar="URL",
              help="Database: a file path or SQLAlchemy URL (postgresql://user@host/db). "
                   "Default ./results.db; env HPARRAY_DB.")
@click.option("--config-dir", type=click.Path(path_type=Path), default=Path("configs"), show_default=True,
              help="Folder with base.yaml and the *_search.yaml files.")
@click.option("--metrics", metavar="LIST", default=None,
              help="Override base.yaml's metrics for this run, e.g. psnr,ssim (not part of any config hash).")
@click.option("-v", "--verbose", is_flag=True, help="Log more and show tracebacks on errors.")
@click.version_option(package_name="hparray")
@click.pass_context
def cli(ctx: click.Context, db: str | None, config_dir: Path, metrics: str | None, verbose: bool) -> None:
    """Sweep test-time fine-tuning hyperparameters of a video model, one factor at a time,
    as resumable (config, video) rows in a database, run by local workers or a Slurm job array.

    \b
    A sweep in five commands:
      hparray init                         starter configs/ in this folder
      hparray plan --search lr --dry-run   what would run, and its GPU-hours
      hparray plan --search lr             write the rows (idempotent)
      hparray submit --local --workers 2   run them here (or: hparray submit, on Slurm)
      hparray status                       where it stands; add --watch to follow
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    chosen = None
    if metrics is not None:
        chosen = tuple(name.strip() for name in metrics.split(",") if name.strip())
        unknown = [name for name in chosen if name not in METRICS]
        if unknown or not chosen:
            raise click.BadParameter(f"{metrics!r}: use some of {', '.join(METRICS)}", param_hint="--metrics")
    ctx.obj = Context(db=db, config_dir=config_dir, verbose=verbose, metrics=chosen)



def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error becomes one line and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(arg in ("-v", "--verbose") for arg in argv) or os.environ.get("HPARRAY_VERBOSE") == "1"
    try:
        cli.main(args=argv, prog_name="hparray", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.exceptions.ClickException as err:
        where = getattr(err, "ctx", None)
        command = where.command_path if where is not None else "hparray"
        err_console.print(f"error: {err.format_message()} (see `{command} --help`)", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(err.exit_code)
    except HparrayError as err:
        if verbose:
            traceback.print_exc()
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as err:  # a bug: say so in one line unless asked for the traceback
        if verbose:
            traceback.print_exc()
        err_console.print(f"error: unexpected {type(err).__name__}: {err} (run with --verbose for the traceback)",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
