"""`hparray export`: the report's numbers into MLflow, TensorBoard or W&B (hparray/export/ writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from hparray.cli.app import Context, cli, console, pass_context
from hparray.config import Settings

if TYPE_CHECKING:  # numpy and scipy come with these: imported when an export runs
    from hparray.export import Export, Written


@cli.group()
def export() -> None:
    """Send the report's numbers to an experiment tracker: MLflow, TensorBoard or W&B (offline).

    Reads the database alone (no network needed; a login node will do). One run per config, the
    baseline shared by the searches once: its hyperparameters as params, every metric's mean and
    bootstrap CI, the paired difference from the baseline with its CI, p and Holm-adjusted p, the
    search and baseline as tags, per_video.csv as an artifact. The numbers are summary.json's.
    Exporting again updates the same runs, never adds new ones. Each tracker is an extra:
    pip install 'hparray[mlflow]', 'hparray[tensorboard]', 'hparray[wandb]' (all: 'hparray[trackers]').

    \b
    Examples:
      hparray export mlflow                              a file store in results/mlruns
      hparray export mlflow --uri http://mlflow:5000 --experiment ltx-lr
      hparray export tensorboard                         then: tensorboard --logdir results/tensorboard
      hparray export wandb --project ltx-sweeps          then: wandb sync results/wandb/offline-run-*
    """


def _collected(ctx: Context, extra: str, experiment: str | None) -> tuple[Settings, Export]:
    """The tracker's extra checked first, then the report's numbers as runs."""
    from hparray.export import collect, require, sweep_name

    require(extra)
    settings = ctx.settings()
    with console.status("computing the report's numbers..."):
        return settings, collect(ctx.store(create=False), experiment or sweep_name(settings))


def _print_written(written: Written, runs: Export) -> None:
    console.print(f"{written.tracker}: {written.runs} runs ({written.created} created, {written.updated} updated), "
                  f"{written.where}")
    for note in written.notes:
        console.print(note)
    if runs.partial:
        console.print(f"[yellow]partial[/]: {runs.pending_rows} rows are not finished; export again later to update "
                      "the same runs")


@export.command("mlflow")
@click.option("--uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
              help="A folder (a file store) or a tracking URI (http://host:5000, sqlite:///mlflow.db). "
                   "Default results/mlruns under base.yaml's output_dir; env MLFLOW_TRACKING_URI.")
@click.option("--experiment", default=None, metavar="NAME",
              help="MLflow experiment (created if missing). Default: the project folder's name.")
@pass_context
def export_mlflow(ctx: Context, uri: str | None, experiment: str | None) -> None:
    """MLflow: a file store or a tracking URI, one run per config.

    A run is found again by its hparray.config_hash tag, in an experiment named after the project.

    \b
    Filter in MLflow, e.g.:
      tags.`hparray.search` LIKE '%lr%'    tags.`hparray.baseline` = 'true'    metrics.`psnr/mean` > 20
    """
    from hparray.export.mlflow import export_mlflow as write

    settings, runs = _collected(ctx, "mlflow", experiment)
    _print_written(write(runs, uri or settings.output_path() / "mlruns"), runs)


@export.command("tensorboard")
@click.option("--logdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="TensorBoard log folder, one subfolder per config (default: results/tensorboard under "
                   "base.yaml's output_dir).")
@pass_context
def export_tensorboard(ctx: Context, logdir: Path | None) -> None:
    """TensorBoard: HParams and scalars, one run folder per config.

    For the HParams dashboard: its table and parallel-coordinates view compare configs.

    Then: tensorboard --logdir results/tensorboard, tab HPARAMS.
    """
    from hparray.export.tensorboard import export_tensorboard as write

    settings, runs = _collected(ctx, "tensorboard", None)
    _print_written(write(runs, logdir or settings.output_path() / "tensorboard"), runs)


@export.command("wandb")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the offline runs go, as DIR/wandb/offline-run-* (default: base.yaml's output_dir).")
@click.option("--project", default=None, help="W&B project (default: the experiment name).")
@click.option("--experiment", default=None, metavar="NAME",
              help="The runs' W&B group, part of their ids. Default: the project folder's name.")
@pass_context
def export_wandb(ctx: Context, directory: Path | None, project: str | None, experiment: str | None) -> None:
    """W&B, offline: one run per config, for `wandb sync`.

    Each run has a fixed id (experiment and config hash), so syncing again updates the same runs.
    """
    from hparray.export.wandb import export_wandb as write

    settings, runs = _collected(ctx, "wandb", experiment)
    _print_written(write(runs, directory or settings.output_path(), project), runs)
