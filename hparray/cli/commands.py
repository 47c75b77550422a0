"""The commands: each parses its flags, calls the core, and hands the result to `render`."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hparray import notify, slurm
from hparray.cli import render
from hparray.cli.app import Context, cli, console, err_console, pass_context
from hparray.config import Settings
from hparray.errors import BadInput, HparrayError
from hparray.status import StatusWithSlurm, sweep_status
from hparray.store import Store, TaskCounts

# ---------------------------------------------------------------- init


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), default=Path("."), required=False)
@click.option("--force", is_flag=True, help="Overwrite starter config files that already exist.")
@click.option("--example", metavar="NAME", default=None,
              help="Start base.yaml from a shipped example instead: opensora_v1_3 (Open-Sora v1.3 as a resident "
                   "server).")
def init(folder: Path, force: bool, example: str | None) -> None:
    """Start a project: write commented starter configs into FOLDER/configs/ (default: here).

    base.yaml (baseline, data, runner, model, metrics, tasks, Slurm) and the three searches
    (lr, condition_frames, steps). The first command after `pip install hparray`; then edit
    configs/base.yaml and run `hparray plan --search lr --dry-run` in FOLDER.
    """
    from hparray.resources import write_starter_configs

    written = write_starter_configs(folder, force=force, example=example)
    console.print(f"wrote {len(written)} files to {written[0].parent}: {', '.join(p.name for p in written)}")
    console.print("next: edit configs/base.yaml (data.source, runner, model, slurm), then "
                  "[bold]hparray plan --search lr --dry-run[/]" + (f" in {folder}" if str(folder) != "." else ""))


@cli.command()
def servers() -> None:
    """Print the folder of hparray_serve.py (the server side of the resident runner's protocol,
    standard library only) and the shipped example servers; put it on PYTHONPATH to run a server
    by hand (the worker does that itself). In runner.command it is the placeholder {servers}."""
    from hparray.runners.resident import SERVERS_DIR

    click.echo(str(SERVERS_DIR))


# ---------------------------------------------------------------- plan


@cli.command()
@click.option("--search", "which", required=True, metavar="NAME",
              help="Which search to plan: lr, condition_frames, steps (a *_search.yaml name), all, or confirm "
                   "(once all are finished: their best values together, against the baseline).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@pass_context
def plan(ctx: Context, which: str, dry_run: bool) -> None:
    """Expand searches into (config, video) rows; identical work is planned once.

    Each search varies one factor of the baseline. The baseline point shared by all searches
    is one set of rows, and the un-fine-tuned inference is one row per (video,
    condition_frames). Planning again adds only what is missing and never touches finished rows.
    """
    from hparray.confirm import CONFIRM, combination, confirm_plan
    from hparray.gpu_memory import memory_fit
    from hparray.plan import apply, build_plan, existing_rows, model_description, select_videos
    from hparray.runners import check_runner

    sweep = ctx.sweep()
    combo = combination(sweep, ctx.store(create=False)) if which == CONFIRM else None
    searches = sweep.select(which) if combo is None else []
    check_runner(sweep.settings)
    with console.status("choosing and checking videos..."):
        videos = select_videos(sweep.settings)
    result = build_plan(sweep, which, videos) if combo is None else confirm_plan(sweep, videos, combo)
    if combo is not None:
        searches = result.searches
        console.print(f"confirm: {' + '.join(combo.chosen.values())} (each search's best {combo.metric}) together, "
                      "against the baseline config, on the same videos")
    if dry_run:
        existing = existing_rows(ctx.db)
    else:
        store = ctx.store()
        existing = store.existing_task_keys()
        counts = apply(store, result, time.time())
        _resume_skipped(sweep.settings, store)
    new_tasks = render.new_rows(result, existing)
    console.print(render.plan_table(which, result))
    fit = memory_fit(sweep.settings, result.largest_condition_frames(), local=False)
    for line in render.plan_lines(result, videos, sweep.settings.data.source, model_description(sweep.settings),
                                  len(searches), fit):
        console.print(line)
    if dry_run:
        console.print(f"[bold]dry run[/]: would add {len(new_tasks)} rows, {len(result.tasks) - len(new_tasks)} "
                      f"already planned; estimated {result.gpu_hours(new_tasks):.1f} GPU-hours for the new rows. "
                      "Nothing written.")
    else:
        console.print(f"added {counts.new_tasks} rows ({counts.existing_tasks} already planned) to {store.url}; "
                      f"estimated {result.gpu_hours(new_tasks):.1f} GPU-hours for the new rows.")
        console.print("next: [bold]hparray submit --local --workers N[/] here, or [bold]hparray submit[/] on Slurm")


# ---------------------------------------------------------------- worker


@cli.command()
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="Stop after this many tasks.")
@click.option("--worker-id", default=None, help="Name of this worker (default: host, Slurm ids, pid).")
@click.option("--poll-s", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="How often to look again while rows wait on running dependencies.")
@pass_context
def worker(ctx: Context, max_tasks: int | None, worker_id: str | None, poll_s: float) -> None:
    """Claim and run rows until none is left (one per GPU; Slurm array tasks run this).

    Heartbeats while a task runs; on SIGTERM, SIGINT or SIGUSR1 (Slurm's time-limit warning)
    it puts its row back without spending an attempt, or finishes it first if it fits.
    """
    from hparray.worker.runtime import run_worker

    logging.getLogger("hparray").setLevel(logging.DEBUG if ctx.verbose else logging.INFO)
    summary = run_worker(ctx.settings(), ctx.store(create=False), max_tasks=max_tasks, worker_id=worker_id,
                         poll_s=poll_s)
    err_console.print(f"worker done: {summary.done} done, {summary.diverged} diverged, {summary.errors} errors, "
                      f"{summary.released} released, {summary.fenced} fenced ({summary.stop_reason})")


# ---------------------------------------------------------------- submit


@cli.command()
@click.option("--local", "local", is_flag=True, help="Run workers on this machine instead of Slurm.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (--local: default 1 per GPU, else 1) or, on Slurm, the array tasks of this "
                   "sweep in all, queued and running ones included (default slurm.workers; never more than "
                   "the rows left).")
@click.option("--partition", default=None, help="Slurm partition (default slurm.partition).")
@click.option("--time", "time_limit", default=None, metavar="TIME",
              help="Slurm time limit per array task, e.g. 04:00:00 (default slurm.time).")
@click.option("--gpus", type=click.IntRange(min=0), default=None,
              help="GPUs per array task (default slurm.gpus_per_task).")
@click.option("--throttle", type=click.IntRange(min=1), default=None,
              help="Most array tasks running at once (default slurm.throttle).")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="OPTION",
              help="Any other sbatch option, e.g. --sbatch-arg=--mail-type=END (repeatable).")
@click.option("--dry-run", is_flag=True, help="Slurm: print the batch script and the sbatch command; submit nothing.")
@pass_context
def submit(ctx: Context, local: bool, workers: int | None, partition: str | None, time_limit: str | None,
           gpus: int | None, throttle: int | None, sbatch_args: tuple[str, ...], dry_run: bool) -> None:
    """Run the planned rows: a Slurm job array of workers (when sbatch is here), or local workers.

    Every worker claims rows one at a time, so stopping and submitting again resumes exactly
    where the sweep stopped, down to the single video. On Slurm the array is a pool of workers
    sized to the rows left; the script comes from sbatch/worker.sbatch.j2.
    """
    from hparray.doctor import before_submit
    from hparray.environment import visible_gpus
    from hparray.worker.executor import run_local

    overrides = slurm.Overrides(partition=partition, time=time_limit, gpus=gpus, sbatch_args=sbatch_args)
    backend = slurm.choose_backend(local=local, dry_run=dry_run, overrides=overrides, throttle=throttle)
    console.print(backend.message)
    settings = ctx.settings()
    store = ctx.store(create=False)
    _resume_skipped(settings, store, dry_run=dry_run)
    before_submit(settings, store, local=not backend.slurm)
    if backend.slurm:
        submission = slurm.submit(settings, store, worker_command=[sys.executable, "-m", "hparray",
                                                                   *ctx.global_args(store), "worker"],
                                  workers=workers, throttle=throttle, overrides=overrides, dry_run=dry_run)
        render.print_submission(submission)
        return
    count = workers or max(1, len(visible_gpus()))
    before = store.task_counts()
    if dry_run:
        console.print(f"dry run: would run {before.runnable} claimable rows with {count} local worker(s); "
                      "nothing started")
        return
    if before.to_run == 0:
        if before.failed or before.blocked:
            console.print(f"nothing to run now: {before.failed} rows failed for good and {before.blocked} more wait "
                          "behind failed or diverged un-fine-tuned rows. `hparray status` shows why they failed; "
                          "`hparray retry --failed` runs them again after a fix.")
        else:
            skipped = f" ({before.skipped} skipped by sequential stopping)" if before.skipped else ""
            console.print(f"nothing to run: every planned row is finished{skipped}. `hparray status` shows the "
                          "results.")
        return
    log_dir = settings.output_path() / "logs"
    console.print(f"running {before.to_run} rows with {count} local worker(s); logs in {log_dir}; Ctrl-C stops "
                  "cleanly")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("sweep", total=before.to_run, detail="")

        def show(done: int, total: int, now: TaskCounts) -> None:
            progress.update(bar, completed=done, total=total, detail=f"running {now.running}, failed {now.failed}")

        report = run_local(store, [*ctx.global_args(store), "worker"], count,
                           grace_s=settings.tasks.heartbeat_grace_s, log_dir=log_dir, progress=show)
    final = sweep_status(store, time.time(), settings.tasks.heartbeat_grace_s)
    console.print(f"{final.counts.done} done, {final.counts.diverged} diverged, {final.counts.failed} failed, "
                  f"{final.counts.pending} pending, {final.counts.skipped} skipped of {final.counts.total} rows "
                  f"({report.replaced} workers replaced)")
    if report.interrupted:
        console.print("stopped by you; claimed rows were put back. Run the same command to resume.")
        raise SystemExit(130)
    notify.sweep_finished(settings, store, f"submit --local ({os.getpid()})")  # once: a worker may have told
    if report.gave_up:
        raise HparrayError(f"gave up: {report.gave_up}")
    if final.counts.failed:
        console.print(f"[yellow]{final.counts.failed} rows failed[/]: `hparray status` and the logs say why")


# ---------------------------------------------------------------- status, reap, cancel


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (total, pending, running, done, failed, ...).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@pass_context
def status(ctx: Context, as_json: bool, watch: bool, interval: float) -> None:
    """Rows per search and config, metrics so far, live workers, failed rows, throughput and ETA.

    On Slurm also the sweep's jobs as squeue sees them (and why an array is pending); rows of array
    tasks Slurm no longer runs are put back at once. Works on a database it cannot write (it then
    says that it could not reap).
    """
    store = ctx.store(create=False)
    grace_s, interval_s = _grace_s(ctx), _heartbeat_interval_s(ctx)
    current = StatusWithSlurm()
    if as_json:
        click.echo(json.dumps(current(store, time.time(), grace_s, interval_s).to_json(), indent=2, default=str))
        return
    if not watch:
        for part in render.render_status(current(store, time.time(), grace_s, interval_s)):
            console.print(part)
        return
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(Group(*render.render_status(current(store, time.time(), grace_s, interval_s))),
                            refresh=True)
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


def _resume_skipped(settings: Settings, store: Store, dry_run: bool = False) -> None:
    """With sequential stopping off, the rows it skipped are pending again (docs/statistics.md)."""
    from hparray.stopping import resume_if_off

    resumed = resume_if_off(settings, store, time.time(), dry_run=dry_run)
    if resumed:
        console.print(f"{'would resume' if dry_run else 'resumed'} {resumed} rows that sequential stopping had "
                      "skipped: stopping.enabled is false in base.yaml")


def _grace_s(ctx: Context) -> float:
    """The configured heartbeat grace, or the default when status runs away from the configs."""
    try:
        return ctx.settings().tasks.heartbeat_grace_s
    except BadInput:
        return 300.0


def _heartbeat_interval_s(ctx: Context) -> float:
    """The configured heartbeat interval, or the default when status runs away from the configs."""
    try:
        return ctx.settings().tasks.heartbeat_interval_s
    except BadInput:
        return 30.0


@cli.command()
@pass_context
def reap(ctx: Context) -> None:
    """Put rows back whose worker stopped heartbeating, or whose Slurm task is gone (workers and
    status do this too)."""
    result = slurm.reap(ctx.store(create=False), time.time(), _grace_s(ctx))
    report = result.report
    gone = f" ({len(result.gone_workers)} workers gone from Slurm)" if result.gone_workers else ""
    console.print(f"reaped: {len(report.released)} rows pending again, {len(report.failed)} failed for good{gone}")


@cli.command()
@click.option("--wait-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="How long to wait for the workers to put their rows back before releasing them.")
@pass_context
def cancel(ctx: Context, wait_s: float) -> None:
    """scancel this sweep's Slurm jobs and put their rows back; `hparray submit` resumes."""
    result = slurm.cancel(ctx.store(create=False), _grace_s(ctx), wait_s=wait_s)
    if not result.job_ids:
        console.print("no job of this sweep is queued or running")
        return
    console.print(f"cancelled job(s) {', '.join(result.job_ids)}; {len(result.released)} rows of killed workers "
                  f"put back ({len(result.failed)} failed for good)")
    if result.still_running:
        console.print(f"[yellow]still running after {wait_s:.0f} s[/]: {', '.join(result.still_running)}; "
                      "Slurm kills them after its KillWait")
    console.print("next: [bold]hparray submit[/] resumes the rows that are left")


# ---------------------------------------------------------------- retry


@cli.command()
@click.option("--failed", is_flag=True,
              help="Retry rows that failed for good (the default when neither --failed nor --diverged is given).")
@click.option("--diverged", is_flag=True, help="Retry rows whose run diverged (a NaN or inf loss, no metrics).")
@click.option("--config", "configs", multiple=True, metavar="NAME",
              help="Only rows of this config, e.g. lr_1e-4 or no_finetune_cf_22 (repeatable).")
@click.option("--video", "videos", multiple=True, metavar="NAME", help="Only rows of this video (repeatable).")
@click.option("--search", "searches", multiple=True, metavar="NAME",
              help="Only rows of this search, its un-fine-tuned rows included (repeatable).")
@click.option("--dry-run", is_flag=True, help="List the rows that would change; change nothing.")
@pass_context
def retry(ctx: Context, failed: bool, diverged: bool, configs: tuple[str, ...], videos: tuple[str, ...],
          searches: tuple[str, ...], dry_run: bool) -> None:
    """Put failed (or diverged) rows back to pending with fresh attempts; `hparray submit` runs them.

    Without --failed or --diverged, failed rows are retried; filters narrow them down. Rows
    waiting on a retried un-fine-tuned row come back with it, and a waiting row picked by a
    filter brings back the row it waits on. Every attempt so far stays in the database (the
    report counts the retries); running rows are never touched.
    """
    from hparray.store.retry import RetrySelection
    from hparray.store.retry import retry as retry_rows

    statuses = tuple(s for s, wanted in (("failed", failed), ("diverged", diverged)) if wanted) or ("failed",)
    selection = RetrySelection(statuses=statuses, configs=configs, videos=videos, searches=searches)
    result = retry_rows(ctx.store(create=False), selection, time.time(), dry_run=dry_run)
    for part in render.render_retry(result, statuses):
        console.print(part)


# ---------------------------------------------------------------- report and doctor


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for summary.json, progress.json, per_video.csv, plots/ and report.html "
                   "(default: base.yaml's output_dir).")
@pass_context
def report(ctx: Context, out: Path | None) -> None:
    """What the sweep found: per-config means with bootstrap CIs, paired Wilcoxon tests against
    the baseline config, the un-fine-tuned model and the last-frame predictor; plots and one HTML page.

    Works while the sweep runs: unfinished configs are marked partial. Running it again
    rewrites the same files. Works on a database it cannot write.
    """
    from hparray.report import build_report

    with console.status("computing the report..."):
        result = build_report(ctx.settings(), ctx.store(create=False), out)
    for part in render.render_report(result):
        console.print(part)


@cli.command()
@pass_context
def doctor(ctx: Context) -> None:
    """Check this machine before GPU time is spent: packages and extras, GPUs, LPIPS weights, the
    runner, the database, journal mode and filesystem, SQLite version, Slurm, whether an array task
    fits a node of the partition and a row fits the time limit, free disk."""
    from hparray.doctor import run_checks

    try:
        settings: Settings | None = ctx.settings()
    except BadInput as err:
        err_console.print(f"[yellow]configs: {err}[/]")
        settings = None
    checks = run_checks(settings, ctx.db)
    console.print(render.doctor_table(checks))
    failed = [check.name for check in checks if check.state == "fail"]
    if failed or settings is None:
        raise HparrayError(f"doctor: fix {', '.join(failed or ['configs'])} before submitting")

