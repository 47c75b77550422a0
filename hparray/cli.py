"""The `hparray` command: parse, call one core function, render with rich.

One place (`main`) turns the project's exception root into one line and an exit code
(2: bad input, 1: runtime failure); the traceback only with --verbose.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hparray import slurm
from hparray.config import METRICS, Settings, SweepConfig, load_settings, load_sweep
from hparray.errors import BadInput, HparrayError
from hparray.status import SweepStatus, sweep_status
from hparray.store import Store

if TYPE_CHECKING:  # the report pulls in numpy and scipy: imported only by `report`
    from hparray.report import Report

# Tables stay readable in logs and pipes, where rich would otherwise assume 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)
log = logging.getLogger("hparray")


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
        return settings if self.metrics is None else dataclasses.replace(settings, metrics=self.metrics)

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


# ---------------------------------------------------------------- init


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), default=Path("."), required=False)
@click.option("--force", is_flag=True, help="Overwrite starter config files that already exist.")
def init(folder: Path, force: bool) -> None:
    """Start a project: write commented starter configs into FOLDER/configs/ (default: here).

    base.yaml (baseline, data, runner, model, metrics, tasks, Slurm) and the three searches
    (lr, condition_frames, steps). The first command after `pip install hparray`; then edit
    configs/base.yaml and run `hparray plan --search lr --dry-run` in FOLDER.
    """
    from hparray.config import write_starter_configs

    written = write_starter_configs(folder, force=force)
    console.print(f"wrote {len(written)} files to {written[0].parent}: {', '.join(p.name for p in written)}")
    console.print("next: edit configs/base.yaml (data.source, runner, model, slurm), then "
                  "[bold]hparray plan --search lr --dry-run[/]" + (f" in {folder}" if str(folder) != "." else ""))


# ---------------------------------------------------------------- plan


@cli.command()
@click.option("--search", "which", required=True, metavar="NAME",
              help="Which search to plan: lr, condition_frames, steps (a *_search.yaml name) or all.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@pass_context
def plan(ctx: Context, which: str, dry_run: bool) -> None:
    """Expand searches into (config, video) rows; identical work is planned once.

    Each search varies one factor of the baseline. The baseline point shared by all searches
    is one set of rows, and the un-fine-tuned inference is one row per (video,
    condition_frames). Planning again adds only what is missing and never touches finished rows.
    """
    from hparray.plan import build_plan, model_description, select_videos
    from hparray.runner import check_runner

    sweep = ctx.sweep()
    searches = sweep.select(which)
    check_runner(sweep.settings)
    with console.status("choosing and checking videos..."):
        videos = select_videos(sweep.settings)
    result = build_plan(sweep, which, videos)
    if dry_run:
        existing = _existing_keys(ctx)
    else:
        store = ctx.store()
        existing = store.existing_task_keys()
        counts = store.apply_plan(result.config_rows(), result.search_config_rows(), result.video_rows(),
                                  result.tasks, sweep.settings.tasks.max_attempts, time.time(),
                                  max_losses=sweep.settings.tasks.max_losses)
    new_tasks = [t for t in result.tasks if (t.config_hash, t.video) not in existing]

    table = Table(title=f"plan: search {which}", title_justify="left")
    for column in ("config", "kind", "lr", "cond. frames", "steps", "hash"):
        table.add_column(column, no_wrap=True)
    for config in result.configs:
        if config.kind == "finetune":
            name = config.label + ("  (baseline)" if config.baseline_in else "")
            table.add_row(name, "fine-tune", f"{config.hp.lr:g}", str(config.hp.condition_frames),
                          str(config.hp.finetune_steps), config.hash[:10])
        else:
            table.add_row(config.label, "inference", "-", str(config.hp.condition_frames), "0", config.hash[:10])
    console.print(table)
    categories = Counter(v.category for v in videos)
    console.print(f"videos: {len(videos)} from {sweep.settings.data.source!r} "
                  f"({', '.join(f'{k} {n}' for k, n in sorted(categories.items()))})")
    console.print(f"model: {model_description(sweep.settings)}")
    kinds = Counter(t.kind for t in result.tasks)
    console.print(f"rows: {len(result.tasks)} ({kinds['finetune']} fine-tune, {kinds['baseline']} baseline inference) "
                  f"for {len(searches)} search(es)")
    if dry_run:
        console.print(f"[bold]dry run[/]: would add {len(new_tasks)} rows, {len(result.tasks) - len(new_tasks)} "
                      f"already planned; estimated {result.gpu_hours(new_tasks):.1f} GPU-hours for the new rows. "
                      "Nothing written.")
    else:
        console.print(f"added {counts.new_tasks} rows ({counts.existing_tasks} already planned) to {store.url}; "
                      f"estimated {result.gpu_hours(new_tasks):.1f} GPU-hours for the new rows.")
        console.print("next: [bold]hparray submit --local --workers N[/] here, or [bold]hparray submit[/] on Slurm")


def _existing_keys(ctx: Context) -> set[tuple[str, str]]:
    """Rows already planned, without creating a database that does not exist yet."""
    try:
        store = ctx.store(create=False)
    except HparrayError as err:
        if "no database" in str(err):
            return set()
        raise
    return store.existing_task_keys()


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
    from hparray.runtime import run_worker

    logging.getLogger("hparray").setLevel(logging.DEBUG if ctx.verbose else logging.INFO)
    summary = run_worker(ctx.settings(), ctx.store(create=False), max_tasks=max_tasks, worker_id=worker_id,
                         poll_s=poll_s)
    err_console.print(f"worker done: {summary.done} done, {summary.diverged} diverged, {summary.errors} errors, "
                      f"{summary.released} released, {summary.fenced} fenced ({summary.stop_reason})")


# ---------------------------------------------------------------- submit


@cli.command()
@click.option("--local", "local", is_flag=True, help="Run workers on this machine instead of Slurm.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (--local: default 1 per GPU, else 1) or, on Slurm, the most array "
                   "tasks (default slurm.workers; never more than the rows left).")
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
    from hparray.executor import Counts, LocalExecutor, visible_gpus

    overrides = slurm.Overrides(partition=partition, time=time_limit, gpus=gpus, sbatch_args=sbatch_args)
    backend = slurm.choose_backend(local=local, dry_run=dry_run, overrides=overrides, throttle=throttle)
    console.print(backend.message)
    settings = ctx.settings()
    store = ctx.store(create=False)
    before_submit(settings)
    if backend.slurm:
        submission = slurm.submit(settings, store, worker_command=[sys.executable, "-m", "hparray",
                                                                   *ctx.global_args(store), "worker"],
                                  workers=workers, throttle=throttle, overrides=overrides, dry_run=dry_run)
        _print_submission(submission)
        return
    count = workers or max(1, len(visible_gpus()))
    if dry_run:
        console.print(f"dry run: would run {slurm.claimable_rows(store)} claimable rows with {count} local "
                      "worker(s); nothing started")
        return
    log_dir = settings.output_path() / "logs"
    before = Counts.read(store)
    todo = before.to_run
    if todo == 0:
        if before.failed or before.blocked:
            console.print(f"nothing to run now: {before.failed} rows failed for good and {before.blocked} more wait "
                          "behind failed or diverged un-fine-tuned rows. `hparray status` shows why they failed; "
                          "`hparray retry --failed` runs them again after a fix.")
        else:
            console.print("nothing to run: every planned row is finished. `hparray status` shows the results.")
        return
    console.print(f"running {todo} rows with {count} local worker(s); logs in {log_dir}; Ctrl-C stops cleanly")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("sweep", total=todo, detail="")

        def refresh() -> None:
            now = Counts.read(store)
            done = now.finished - before.finished
            # Rows planned while this runs join the bar: its total is what is done plus what is left.
            progress.update(bar, completed=done, total=done + now.to_run,
                            detail=f"running {now.running}, failed {now.failed}")

        report = LocalExecutor(store, [*ctx.global_args(store), "worker"], count,
                               grace_s=settings.tasks.heartbeat_grace_s, log_dir=log_dir, progress=refresh).run()
    final = sweep_status(store, time.time(), settings.tasks.heartbeat_grace_s)
    console.print(f"{final.done} done, {final.diverged} diverged, {final.failed} failed, "
                  f"{final.pending} pending of {final.total} rows ({report.replaced} workers replaced)")
    if report.interrupted:
        console.print("stopped by you; claimed rows were put back. Run the same command to resume.")
        raise SystemExit(130)
    if report.gave_up:
        raise HparrayError(f"gave up: {report.gave_up}")
    if final.failed:
        console.print(f"[yellow]{final.failed} rows failed[/]: `hparray status` and the logs say why")


def _print_submission(s: slurm.Submission) -> None:
    """What `submit` did on Slurm, or would do (--dry-run): scripts, commands, job ids, next step."""
    if s.reaped:
        console.print(f"{s.reaped} rows of workers Slurm no longer runs were put back first")
    for note in s.notes:
        console.print(note, markup=False, highlight=False)
    if not s.arrays:
        if s.active_workers and s.claimable:
            console.print(f"nothing submitted: {s.active_workers} array tasks of this sweep "
                          f"({', '.join(s.active_jobs)}) are already queued or running for {s.claimable} claimable "
                          f"rows, and {s.wanted} workers were asked for in all; `--workers N` asks for N in all",
                          markup=False, highlight=False)
        else:
            held = f" ({s.running} running)" if s.running else ""
            console.print(f"nothing to submit: no row is left to claim{held}. `hparray status` shows where it "
                          "stands.")
        return
    if s.active_workers:
        console.print(f"note: {s.active_workers} array tasks of job(s) {', '.join(s.active_jobs)} are already "
                      f"queued or running; adding {sum(a.size for a in s.arrays)} for {s.wanted} workers in all",
                      markup=False, highlight=False)
    gpu = f"--gres=gpu:{s.gpus}" if s.gpus else "no GPU"
    for array in s.arrays:
        if s.dry_run:
            click.echo(array.script, nl=False)
            console.print(f"sbatch command: {shlex.join(array.command)}", markup=False, highlight=False, soft_wrap=True)
        what = (f"array 0-{array.size - 1}%{array.throttle}: {array.size} workers for {s.claimable} claimable rows, "
                f"at most {array.throttle} at once, {gpu}, signal B:USR1@{s.signal_grace_s}, "
                f"logs {s.log_dir}/%x_%A_%a.out|.err")
        if array.job_id:
            console.print(f"submitted job {array.job_id}: {what}", markup=False, highlight=False, soft_wrap=True)
        else:
            console.print(f"would submit {what}", markup=False, highlight=False, soft_wrap=True)
    if len(s.arrays) > 1:
        console.print(f"split into {len(s.arrays)} arrays: MaxArraySize here is {s.max_array_size}")
    if s.dry_run:
        console.print("dry run: nothing submitted, nothing written")
    else:
        console.print("next: [bold]hparray status[/] (add --watch to follow); [bold]hparray cancel[/] stops the jobs")


# ---------------------------------------------------------------- status and reap


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (total, pending, running, done, failed, ...).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@pass_context
def status(ctx: Context, as_json: bool, watch: bool, interval: float) -> None:
    """Rows per search and config, metrics so far, live workers, throughput and ETA.

    On Slurm also the sweep's jobs as squeue sees them; rows of array tasks Slurm no longer runs
    are put back at once.
    """
    store = ctx.store(create=False)
    grace_s, interval_s = _grace_s(ctx), _heartbeat_interval_s(ctx)
    current = slurm.StatusWithSlurm()
    if as_json:
        click.echo(json.dumps(current(store, time.time(), grace_s, interval_s).to_json(), indent=2, default=str))
        return
    if not watch:
        for part in render_status(current(store, time.time(), grace_s, interval_s)):
            console.print(part)
        return
    from rich.console import Group

    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(Group(*render_status(current(store, time.time(), grace_s, interval_s))), refresh=True)
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


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


def render_status(s: SweepStatus) -> list[RenderableType]:
    """Rich renderables for a status snapshot."""
    parts: list[RenderableType] = []
    for search, configs in s.searches().items():
        table = Table(title=f"search: {search}", title_justify="left")
        for column in ("config", "pending", "running", "done", "diverged", "failed", "PSNR", "SSIM", "LPIPS",
                       "GPU-min"):
            table.add_column(column, justify="left" if column == "config" else "right", no_wrap=True)
        for c in configs:
            table.add_row(c.name + (" *" if c.is_baseline else ""), str(c.pending), str(c.running), str(c.done),
                          str(c.diverged), _red(c.failed), _num(c.psnr, 2), _num(c.ssim, 4), _num(c.lpips, 4),
                          f"{c.gpu_minutes:.1f}")
        parts.append(table)
    if s.workers:
        table = Table(title="workers", title_justify="left")
        for column in ("worker", "host", "slurm job", "gpu", "task", "done", "heartbeat"):
            table.add_column(column)
        for w in s.workers:
            job = (f"{w.slurm_array_job_id}_{w.slurm_array_task_id}" if w.slurm_array_job_id else
                   w.slurm_job_id or "-")
            beat = f"{w.heartbeat_age_s:.0f} s ago" + (" [red]STALE[/]" if w.stale else "")
            table.add_row(w.id, w.host, job, w.gpu or "-", w.task or "idle", str(w.tasks_done), beat)
        parts.append(table)
    if s.slurm_jobs:
        table = Table(title="slurm jobs", title_justify="left")
        for column in ("job", "array", "throttle", "submitted", "slurm"):
            table.add_column(column)
        for entry in s.slurm_jobs:
            table.add_row(entry["job_id"], str(entry["array_size"]), str(entry["throttle"]),
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["submitted_at"])), entry["summary"])
        parts.append(table)
    if s.failed_rows:
        table = Table(title=f"failed rows ({s.failed} in all; `hparray retry --failed` runs them again)",
                      title_justify="left")
        for column in ("row", "config", "video", "errors/losses", "last error"):
            table.add_column(column, overflow="fold")
        for failed in s.failed_rows:
            first = (failed["error"].splitlines() or [""])[0]
            table.add_row(f"#{failed['task_id']}", failed["config"], failed["video"],
                          f"{failed['errors']}/{failed['losses']}", escape(first[:200]))
        parts.append(table)
    for row in s.hung:
        parts.append(f"[yellow]hung[/]: row #{row['task_id']} in Slurm task {row['slurm_task']} ({row['slurm_state']}) "
                     f"has not heartbeated for {row['heartbeat_age_s']:.0f} s; put back once the grace passes")
    eta = "-" if s.eta_s is None else _duration(s.eta_s)
    blocked = f", {s.blocked} blocked by a failed dependency" if s.blocked else ""
    parts.append(
        f"total {s.total}: {s.pending} pending, {s.running} running, {s.done} done, {s.diverged} diverged, "
        f"{s.failed} failed{blocked} | {s.gpu_minutes:.1f} GPU-min spent | {s.throughput_per_hour:.0f} rows/h "
        f"| ETA {eta}"
    )
    db = s.database
    journal = f", journal {db['journal_mode']} on {db['filesystem']}" if db.get("journal_mode") else ""
    parts.append(f"[dim]database {db['url']} ({db['dialect']}, schema v{db['schema_version']}{journal})"
                 + (f"; reaped {len(s.reaped)} stale rows" if s.reaped else "") + "[/]")
    if s.reap_problem:
        parts.append(f"[yellow]{escape(s.reap_problem)}[/]")
    if not s.configs:
        parts.append("no rows yet: run `hparray plan --search lr` first")
    return parts


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _red(count: int) -> str:
    return f"[red]{count}[/]" if count else "0"


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


# ---------------------------------------------------------------- report


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for summary.json, progress.json, per_video.csv, plots/ and report.html "
                   "(default: base.yaml's output_dir).")
@pass_context
def report(ctx: Context, out: Path | None) -> None:
    """What the sweep found: per-config means with bootstrap CIs, paired Wilcoxon tests against
    the baseline config, the un-fine-tuned model and the last-frame predictor; plots and one HTML page.

    Works while the sweep runs: unfinished configs are marked partial. Running it again
    rewrites the same files.
    """
    from hparray.report import build_report

    with console.status("computing the report..."):
        result = build_report(ctx.settings(), ctx.store(create=False), out)
    for part in render_report(result):
        console.print(part)


def render_report(r: Report) -> list[RenderableType]:
    """Rich renderables for a `hparray.report.Report`: one table per search, best values starred.

    Each metric cell stacks the mean, its CI and the paired difference from the search's
    baseline config, so three metrics still fit 120 columns.
    """
    from rich import box

    from hparray.report import METRIC_LABELS, fmt_metric, fmt_p

    parts: list[RenderableType] = []
    if r.partial:
        blocked = (f" ({r.rows['blocked']} blocked behind a failed or diverged un-fine-tuned row: retry it)"
                   if r.rows["blocked"] else "")
        parts.append(f"[bold red]PARTIAL[/]: {r.rows['pending'] + r.rows['running']} of {r.rows['total']} rows not "
                     f"finished{blocked}; configs marked partial are scored on the videos done so far")
    for s in r.searches:
        title = f"search {s.name}: {s.parameter}, baseline {s.baseline_config or 'none'}"
        table = Table(title=title + (" [red](partial)[/]" if s.partial else ""), title_justify="left",
                      box=box.HORIZONTALS, show_lines=True)
        table.add_column("config", no_wrap=True)
        table.add_column("videos", justify="right", no_wrap=True)
        for metric in r.metrics:
            header = f"{METRIC_LABELS[metric]}\n{escape('[95% CI]')}\nΔ base {escape('[95% CI]')}\np, better"
            table.add_column(header, justify="right",
                             no_wrap=True)
        table.add_column("div/fail", justify="right")
        table.add_column("GPU-h", justify="right")
        for c in s.configs:
            scored = c.metrics[r.metrics[0]].n if r.metrics else 0
            videos = {"completed": f"{scored}/{c.rows['total']}", "pending": "[dim]pending[/]"}.get(
                c.status, f"[red]{scored}/{c.rows['total']}\npartial[/]")
            cells = [c.name + (" *" if c.is_baseline else ""), videos]
            for metric in r.metrics:
                e = c.metrics[metric]
                cell = fmt_metric(e.mean, metric)
                if metric in s.best and s.best[metric].config == c.name:
                    cell = f"[bold green]★ {cell}[/]"
                if e.ci_low is not None:
                    cell += "\n" + escape(f"[{fmt_metric(e.ci_low, metric)}, {fmt_metric(e.ci_high, metric)}]")
                cmp = c.vs_baseline.get(metric)
                if cmp is not None and cmp.mean_diff is not None and not c.is_baseline:
                    paired_ci = ("" if cmp.ci_low is None else
                                 " " + escape(f"[{cmp.ci_low:+.2g}, {cmp.ci_high:+.2g}]"))
                    cell += (f"\n[dim]Δ{cmp.mean_diff:+.2g}{paired_ci}\n"
                             f"p={fmt_p(cmp.p_value)} {cmp.improved}/{cmp.pairs}[/]")
                cells.append(cell)
            cells += [f"{c.rows['diverged']}/{_red(c.rows['failed'])}", f"{c.gpu_hours:.3f}"]
            table.add_row(*cells)
        parts.append(table)
        for metric in r.metrics:
            if metric in s.best:
                best = s.best[metric]
                parts.append(f"  [{'green' if best.significant else 'yellow'}]{best.statement}[/]")
    for c in r.baseline_inference:
        scores = ", ".join(f"{METRIC_LABELS[m]} {fmt_metric(c.metrics[m].mean, m)} (last frame repeated "
                           f"{fmt_metric(c.trivial[m].mean, m)})" for m in r.metrics)
        parts.append(f"un-fine-tuned {c.name}: {c.rows['done']}/{c.rows['total']} done; {scores}")
    if not r.searches:
        parts.append("no fine-tune rows yet: run `hparray plan --search lr` and `hparray submit` first")
    parts.append(f"{r.gpu_hours:.2f} GPU-hours in {r.rows['total']} rows | * baseline config, ★ best mean | "
                 "Δ base: mean per-video difference from the baseline config, with its paired bootstrap CI | "
                 "p: two-sided Wilcoxon signed-rank test of the per-video differences")
    folder = r.files["html"].parent
    parts.append(f"wrote {folder}/: report.html, summary.json, progress.json, per_video.csv, "
                 f"plots/ ({sum(1 for key in r.files if key.startswith('plot:'))} plots)")
    return parts


@cli.command()
@pass_context
def doctor(ctx: Context) -> None:
    """Check this machine before GPU time is spent: packages, GPUs, LPIPS weights, database,
    journal mode and filesystem, SQLite version, Slurm and partition, free disk."""
    from hparray.doctor import run_checks

    try:
        settings: Settings | None = ctx.settings()
    except BadInput as err:
        err_console.print(f"[yellow]configs: {err}[/]")
        settings = None
    checks = run_checks(settings, ctx.db)
    table = Table(title="hparray doctor", title_justify="left")
    for column in ("check", "state", "detail", "fix"):
        table.add_column(column)
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in checks:
        table.add_row(check.name, f"[{colour[check.state]}]{check.state}[/]", check.detail, check.fix)
    console.print(table)
    failed = [check.name for check in checks if check.state == "fail"]
    if failed or settings is None:
        raise HparrayError(f"doctor: fix {', '.join(failed or ['configs'])} before submitting")


# ---------------------------------------------------------------- entry point


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
