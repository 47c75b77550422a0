"""Rich rendering for the commands: tables and lines only, every number computed before it gets here."""

from __future__ import annotations

import shlex
import time
from collections import Counter
from typing import TYPE_CHECKING

import click
from rich import box
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table

from hparray import slurm
from hparray.cli.app import console
from hparray.status import SweepStatus

if TYPE_CHECKING:  # numpy and scipy come with these: imported only by the commands that need them
    from hparray.doctor import Check
    from hparray.gpu_memory import MemoryFit
    from hparray.plan import Plan
    from hparray.report import Report
    from hparray.store.retry import RetryReport
    from hparray.tasks import TaskSpec
    from hparray.videos import VideoRef


def plan_table(which: str, result: Plan) -> Table:
    """The configs a plan would run, baselines marked."""
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
    return table


def plan_lines(result: Plan, videos: list[VideoRef], source: str, model: str, searches: int,
               fit: MemoryFit | None = None) -> list[str]:
    categories = Counter(v.category for v in videos)
    kinds = Counter(t.kind for t in result.tasks)
    lines = [f"videos: {len(videos)} from {source!r} ({', '.join(f'{k} {n}' for k, n in sorted(categories.items()))})",
             f"model: {model}",
             f"rows: {len(result.tasks)} ({kinds['finetune']} fine-tune, {kinds['baseline']} baseline inference) "
             f"for {searches} search(es)"]
    if fit is not None:
        lines.append(f"GPU memory: {fit.line()}")
    return lines


def new_rows(result: Plan, existing: set[tuple[str, str]]) -> list[TaskSpec]:
    return [t for t in result.tasks if (t.config_hash, t.video) not in existing]


def print_submission(s: slurm.Submission) -> None:
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



def render_status(s: SweepStatus) -> list[RenderableType]:
    """Rich renderables for a status snapshot."""
    parts: list[RenderableType] = []
    for search, configs in s.searches().items():
        table = Table(title=f"search: {search}", title_justify="left")
        for column in ("config", "pending", "running", "done", "diverged", "failed", "skipped", "PSNR", "SSIM",
                       "LPIPS", "GPU-min"):
            table.add_column(column, justify="left" if column == "config" else "right", no_wrap=True)
        for c in configs:
            table.add_row(c.name + (" *" if c.is_baseline else "") + (" [yellow]stopped[/]" if c.skipped else ""),
                          str(c.pending), str(c.running), str(c.done), str(c.diverged), _red(c.failed),
                          str(c.skipped), _num(c.psnr, 2), _num(c.ssim, 4), _num(c.lpips, 4), f"{c.gpu_minutes:.1f}")
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
        table = Table(title=f"failed rows ({s.counts.failed} in all; `hparray retry --failed` runs them again)",
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
    n = s.counts
    blocked = f", {n.blocked} blocked by a failed dependency" if n.blocked else ""
    blocked += f", {n.skipped} skipped by sequential stopping" if n.skipped else ""
    parts.append(
        f"total {n.total}: {n.pending} pending, {n.running} running, {n.done} done, {n.diverged} diverged, "
        f"{n.failed} failed{blocked} | {s.gpu_minutes:.1f} GPU-min spent | {s.throughput_per_hour:.0f} rows/h "
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



def render_report(r: Report) -> list[RenderableType]:
    """Rich renderables for a `hparray.report.Report`: one table per search, best values starred.

    Each metric cell stacks the mean, its CI and the paired difference from the search's
    baseline config, so three metrics still fit 120 columns.
    """
    from hparray.metrics import METRIC_LABELS
    from hparray.report.format import fmt_metric, fmt_p

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
            videos = {"completed": f"{scored}/{c.rows['total']}", "pending": "[dim]pending[/]",
                      "stopped": f"[yellow]{scored}/{c.rows['total']}\nstopped[/]"}.get(
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
                parts.append(f"  [{'green' if best.significant else 'yellow'}]{escape(best.statement)}[/]")
        for c in s.configs:
            if c.stopped:
                parts.append(f"  [yellow]{escape(c.name)} {escape(c.stopped)}[/]")
        if s.common_window is not None:
            w = s.common_window
            parts.append(f"  on the same frames for every config ({w.first_frame}-{w.last_frame}, after the largest "
                         f"{s.parameter}):")
            for metric in r.metrics:
                if metric in w.best:
                    best = w.best[metric]
                    parts.append(f"  [{'green' if best.significant else 'yellow'}]{escape(best.statement)}[/]")
    if r.confirmation is not None:
        parts.append(f"confirmation: {r.confirmation.combination} against the baseline")
        for metric in r.metrics:
            if metric in r.confirmation.effects:
                parts.append(f"  {escape(r.confirmation.effects[metric].statement)}")
        parts.append(f"  [dim]{escape(r.confirmation.caveat)}[/]")
    for c in r.baseline_inference:
        scores = ", ".join(f"{METRIC_LABELS[m]} {fmt_metric(c.metrics[m].mean, m)} (last frame repeated "
                           f"{fmt_metric(c.trivial[m].mean, m)})" for m in r.metrics)
        parts.append(f"un-fine-tuned {c.name}: {c.rows['done']}/{c.rows['total']} done; {scores}")
    if not r.searches:
        parts.append("no fine-tune rows yet: run `hparray plan --search lr` and `hparray submit` first")
    if r.stopping is not None:
        parts.append(f"sequential stopping: {r.stopping.skipped_rows} rows of {len(r.stopping.configs)} stopped "
                     f"configs skipped, ~{r.stopping.gpu_hours_saved:.2f} GPU-hours saved ({r.stopping.basis})")
    if r.rows.get("retried"):
        parts.append(f"{r.rows['retried']} rows were retried (`hparray retry`): per_video.csv's retried column says "
                     "how often; their earlier attempts stay in the database")
    parts.append(f"{r.gpu_hours:.2f} GPU-hours in {r.rows['total']} rows | * baseline config, ★ best mean | "
                 "Δ base: mean per-video difference from the baseline config, with its paired bootstrap CI | "
                 "p: two-sided Wilcoxon signed-rank test of the per-video differences")
    folder = r.files["html"].parent
    parts.append(f"wrote {folder}/: report.html, summary.json, progress.json, per_video.csv, "
                 f"plots/ ({sum(1 for key in r.files if key.startswith('plot:'))} plots)")
    return parts



def doctor_table(checks: list[Check]) -> Table:
    table = Table(title="hparray doctor", title_justify="left")
    for column in ("check", "state", "detail", "fix"):
        table.add_column(column)
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in checks:
        table.add_row(check.name, f"[{colour[check.state]}]{check.state}[/]", check.detail, check.fix)
    return table


def render_retry(r: RetryReport, statuses: tuple[str, ...]) -> list[RenderableType]:
    """What `retry` changed (or would, with --dry-run): the rows, the rows waiting on them, and the
    running rows it left alone."""
    which = " or ".join(statuses)
    parts: list[RenderableType] = []
    if r.retried:
        verb = "would retry" if r.dry_run else "retried"
        table = Table(title=f"{verb}: back to pending with fresh budgets", title_justify="left")
        for column in ("row", "config", "video", "status", "attempts", "why", "last error"):
            table.add_column(column, no_wrap=column not in ("why", "last error"))
        for row in [*r.retried, *r.unblocked]:
            error = (row.error or "").splitlines()[0][:80] if row.error else ""
            table.add_row(f"#{row.id}", escape(row.config), escape(row.video), row.status, str(row.attempts),
                          escape(row.reason), escape(error))
        parts.append(table)
    if r.running:
        parts.append(f"left alone: {_rows(len(r.running))} matching the filters, running "
                     f"({', '.join(f'#{row.id}' for row in r.running[:10])})")
    if not r.retried:
        parts.append(f"nothing to retry: no {which} row matches" + ("; nothing changed" if r.dry_run else ""))
        return parts
    kinds = Counter(row.status for row in r.retried)
    counted = ", ".join(f"{n} {status}" for status, n in sorted(kinds.items()))
    attempts = sum(row.attempts for row in r.retried)
    waiting = f"; {_rows(len(r.unblocked))} waiting on them will run once they are done" if r.unblocked else ""
    if r.dry_run:
        parts.append(f"[bold]dry run[/]: would put {_rows(len(r.retried))} ({counted}) back to pending{waiting}. "
                     "Nothing changed.")
    else:
        parts.append(f"retried {_rows(len(r.retried))} ({counted}): pending again with fresh budgets{waiting}; "
                     f"the {attempts} attempts they spent stay recorded")
        parts.append("next: [bold]hparray submit[/] (or submit --local) runs them")
    return parts


def _rows(n: int) -> str:
    return "1 row" if n == 1 else f"{n} rows"
