"""What the sweep found: per-config estimates, paired tests against the baselines, plots, one HTML page.

Every config of a search scores the same videos, so comparisons are paired per video: the
per-video difference from a reference (the search's baseline config, the un-fine-tuned
inference with the same condition_frames, the last-conditioning-frame predictor) is what the
Wilcoxon signed-rank test and the improved-video counts use. Means come with a seeded
percentile bootstrap CI, so rerunning the report on the same rows gives the same numbers.

Computed here, rendered by the CLI. The report reads the rows through the named statement
`report_rows` in sql/queries.sql, works on a sweep that is still running (partial results are
marked as such everywhere) and writes every file atomically, so a reader never sees half a file.

Conventions, stated once here and in the page:
- a metric's mean, std (ddof=1) and CI use the config's rows with status 'done'; diverged and
  failed rows are counted, never scored;
- bootstrap: a fresh `numpy.random.default_rng(BOOTSTRAP_SEED)` per estimate draws a
  (BOOTSTRAP_RESAMPLES, n) matrix of indices with `rng.integers(0, n, size=(B, n))` into the
  values in video-name order; the CI is `np.percentile` (linear) of the B resampled means at
  2.5 and 97.5; one value gives a zero-width CI, none gives no CI;
- Wilcoxon: `scipy.stats.wilcoxon(differences)`, two-sided, zero differences dropped (scipy's
  'wilcox' method); p is None for fewer than 2 pairs and 1.0 when every difference is zero
  (the baseline against itself); Holm-adjusted p-values over a search's configs are given
  alongside, the verdict uses the unadjusted p as the issue asks;
- "improved": the video's metric is better than the reference's (higher PSNR/SSIM, lower LPIPS).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hparray.config import Settings, format_value
from hparray.errors import OutputError
from hparray.store import Store

METRICS = ("psnr", "ssim", "lpips")
METRIC_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS"}
METRIC_UNITS = {"psnr": " dB", "ssim": "", "lpips": ""}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
ALPHA = 0.05
BASELINE_INFERENCE = "baseline_inference"
FINISHED = ("done", "diverged", "failed")
STRIP_VIDEOS = 2  # videos per config in the page's frame strips
STRIP_FRAMES = 4  # frames after condition_frames per strip
STRIP_HEIGHT = 96  # pixels per frame in a strip (small frames are enlarged, large ones shrunk)
CSV_COLUMNS = ("search", "config", "parameter", "value", "video", "category", "kind", "status", "psnr", "ssim",
               "lpips", "finetune_s", "inference_s", "trivial_psnr", "trivial_ssim", "trivial_lpips", "wall_s",
               "condition_frames")
COMPARISONS = {
    "vs_baseline": "the search's baseline config",
    "vs_no_finetune": "un-fine-tuned inference (same video, same condition_frames)",
    "vs_trivial": "last conditioning frame repeated",
}


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class TaskRow:
    """One task as a member of one search (the baseline config's rows appear once per search)."""

    task_id: int
    search: str
    config: str
    config_hash: str
    parameter: str
    value: float
    is_baseline: bool
    video: str
    category: str
    video_path: str
    kind: str
    status: str
    condition_frames: int
    psnr: float | None
    ssim: float | None
    lpips: float | None
    trivial_psnr: float | None
    trivial_ssim: float | None
    trivial_lpips: float | None
    finetune_s: float | None
    inference_s: float | None
    wall_s: float | None
    artifact_dir: str | None
    blocked: bool  # pending behind a baseline row that failed or diverged: it will not run unless retried

    def score(self, metric: str) -> float | None:
        """The metric if this row was scored (status done), else None."""
        value = getattr(self, metric)
        return float(value) if self.status == "done" and value is not None else None

    def trivial(self, metric: str) -> float | None:
        value = getattr(self, f"trivial_{metric}")
        return float(value) if self.status == "done" and value is not None else None


@dataclass
class Estimate:
    """Mean of one metric over a config's scored videos, with its spread and bootstrap CI."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass
class Comparison:
    """Paired per-video differences (config minus reference) of one metric."""

    reference: str
    pairs: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_holm: float | None
    improved: int
    worse: int
    ties: int


@dataclass
class ConfigReport:
    """One config of one search (or one un-fine-tuned inference under 'baseline_inference')."""

    search: str
    name: str
    hash: str
    parameter: str
    value: float
    is_baseline: bool
    condition_frames: int
    status: str  # completed | in_progress | pending
    rows: dict[str, int]
    videos_completed: int
    metrics: dict[str, Estimate]
    vs_baseline: dict[str, Comparison] = field(default_factory=dict)
    vs_no_finetune: dict[str, Comparison] = field(default_factory=dict)
    vs_trivial: dict[str, Comparison] = field(default_factory=dict)
    trivial: dict[str, Estimate] = field(default_factory=dict)  # the trivial predictor (un-fine-tuned rows)
    finetune_s_mean: float | None = None
    inference_s_mean: float | None = None
    finetune_s_total: float = 0.0
    inference_s_total: float = 0.0
    gpu_hours: float = 0.0

    @property
    def partial(self) -> bool:
        return self.status != "completed"


@dataclass
class Best:
    """The best config of a search for one metric, and whether it beat the baseline significantly."""

    metric: str
    config: str
    value: float
    mean: float
    is_baseline: bool
    p_value: float | None
    significant: bool
    statement: str


@dataclass
class SearchReport:
    name: str
    parameter: str
    baseline_config: str | None
    configs: list[ConfigReport]
    best: dict[str, Best]

    @property
    def partial(self) -> bool:
        return any(config.partial for config in self.configs)


@dataclass
class Report:
    """Everything the report found; `files` says where it was written."""

    generated_at: float
    database: str
    partial: bool
    rows: dict[str, int]
    metrics: list[str]
    gpu_hours: float
    searches: list[SearchReport]
    baseline_inference: list[ConfigReport]
    files: dict[str, Path] = field(default_factory=dict)

    def summary_json(self) -> dict[str, Any]:
        """summary.json: every number of the report, plus how it was computed."""
        return {
            "generated_at": self.generated_at,
            "database": self.database,
            "partial": self.partial,
            "rows": self.rows,
            "metrics": self.metrics,
            "gpu_hours": self.gpu_hours,
            "method": method_json(),
            "searches": {s.name: {
                "parameter": s.parameter, "baseline_config": s.baseline_config, "partial": s.partial,
                "best": {m: _plain(b) for m, b in s.best.items()},
                "configs": {c.name: _config_json(c) for c in s.configs},
            } for s in self.searches},
            BASELINE_INFERENCE: {c.name: _config_json(c) for c in self.baseline_inference},
        }

    def progress_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        """progress.json: {search: {config: {"status", metric means when completed, videos_completed
        when in_progress}}}; un-fine-tuned inference under 'baseline_inference'.

        completed: every row finished (done, diverged or failed); pending: none finished or
        running; videos_completed counts finished rows, so it reaches the total exactly when the
        config is completed (its means use the done rows only)."""
        progress: dict[str, dict[str, dict[str, Any]]] = {}
        groups = [(s.name, s.configs) for s in self.searches] + [(BASELINE_INFERENCE, self.baseline_inference)]
        for search, configs in groups:
            entries: dict[str, dict[str, Any]] = {}
            for c in configs:
                entry: dict[str, Any] = {"status": c.status}
                if c.status == "completed":
                    entry.update({m: c.metrics[m].mean for m in METRICS})
                elif c.status == "in_progress":
                    entry["videos_completed"] = c.videos_completed
                entries[c.name] = entry
            progress[search] = entries
        return progress


def method_json() -> dict[str, Any]:
    """How every number was computed, for summary.json and the page."""
    return {
        "estimates": "mean and std (ddof=1) over the config's rows with status 'done'; diverged and failed "
                     "rows are counted, not scored",
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                      "method": "percentile",
                      "procedure": "fresh numpy.random.default_rng(seed) per estimate; indices = "
                                   "rng.integers(0, n, size=(resamples, n)) into the values in video-name "
                                   "order; CI = np.percentile(values[indices].mean(axis=1), [2.5, 97.5])"},
        "test": "scipy.stats.wilcoxon on paired per-video differences (config minus reference), two-sided, "
                "zero differences dropped; p = null for fewer than 2 pairs, 1.0 when every difference is 0",
        "multiple_comparisons": "p_holm: Holm-adjusted over the configs of a search (per metric and "
                                "reference); verdicts use the unadjusted p",
        "alpha": ALPHA,
        "improved": "videos whose metric beats the reference's: higher PSNR/SSIM, lower LPIPS",
        "references": COMPARISONS,
        "gpu_hours": "sum of wall_s of the rows with a result, divided by 3600",
    }


def _plain(obj: Any) -> Any:
    """A dataclass as JSON-ready dicts (finite floats only)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {name: _plain(getattr(obj, name)) for name in obj.__dataclass_fields__}
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _config_json(c: ConfigReport) -> dict[str, Any]:
    data = _plain(c)
    data["partial"] = c.partial
    return data


# ---------------------------------------------------------------- statistics


def bootstrap_ci(values: np.ndarray) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean (see the module docstring for the exact procedure)."""
    n = len(values)
    if n == 0:
        return None
    if n == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = values[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def estimate(by_video: dict[str, float]) -> Estimate:
    """Mean, std and CI of the values, taken in video-name order (the CI depends on the order)."""
    values = np.array([by_video[v] for v in sorted(by_video)], dtype=np.float64)
    ci = bootstrap_ci(values)
    return Estimate(
        n=len(values), mean=float(values.mean()) if len(values) else None,
        std=float(values.std(ddof=1)) if len(values) >= 2 else None,
        ci_low=ci[0] if ci else None, ci_high=ci[1] if ci else None,
    )


def wilcoxon_p(differences: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p; None below 2 pairs, 1.0 when nothing differs."""
    if len(differences) < 2:
        return None
    if not np.any(differences != 0):
        return 1.0
    from scipy.stats import wilcoxon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties and small samples; p is still defined
        p = float(wilcoxon(differences, alternative="two-sided").pvalue)
    return p if math.isfinite(p) else None


def compare(metric: str, config: dict[str, float], reference: dict[str, float], name: str) -> Comparison:
    """Paired differences over the videos both have scored, in video-name order."""
    videos = sorted(set(config) & set(reference))
    diffs = np.array([config[v] - reference[v] for v in videos], dtype=np.float64)
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    ci = bootstrap_ci(diffs)
    return Comparison(
        reference=name, pairs=len(videos), mean_diff=float(diffs.mean()) if len(diffs) else None,
        ci_low=ci[0] if ci else None, ci_high=ci[1] if ci else None, p_value=wilcoxon_p(diffs), p_holm=None,
        improved=int(np.sum(sign * diffs > 0)), worse=int(np.sum(sign * diffs < 0)), ties=int(np.sum(diffs == 0)),
    )


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------- computing


def load_rows(store: Store) -> list[TaskRow]:
    """Every task once per search holding it; un-fine-tuned rows under 'baseline_inference'."""
    rows = []
    for r in store.fetch("report_rows"):
        if r.kind == "baseline":
            search, name, parameter, value, is_baseline = (
                BASELINE_INFERENCE, f"no_finetune_cf_{r.condition_frames}", "condition_frames",
                float(r.condition_frames), False)
        elif r.search is None:
            continue  # a fine-tune config no search holds (never planned that way): nothing to compare
        else:
            search, name, parameter, value, is_baseline = r.search, r.name, r.parameter, float(r.value), \
                bool(r.is_baseline)
        rows.append(TaskRow(
            task_id=r.task_id, search=search, config=name, config_hash=r.config_hash, parameter=parameter,
            value=value, is_baseline=is_baseline, video=r.video, category=r.category, video_path=r.video_path,
            kind=r.kind, status=r.status, condition_frames=int(r.condition_frames),
            psnr=r.psnr, ssim=r.ssim, lpips=r.lpips, trivial_psnr=r.trivial_psnr, trivial_ssim=r.trivial_ssim,
            trivial_lpips=r.trivial_lpips, finetune_s=r.finetune_s, inference_s=r.inference_s, wall_s=r.wall_s,
            artifact_dir=r.artifact_dir,
            blocked=r.status == "pending" and r.depends_status in ("failed", "diverged"),
        ))
    rows.sort(key=lambda row: (row.search == BASELINE_INFERENCE, row.search, row.value, row.video, row.task_id))
    return rows


def _scores(rows: list[TaskRow], metric: str) -> dict[str, float]:
    return {row.video: s for row in rows if (s := row.score(metric)) is not None}


def _config_report(rows: list[TaskRow]) -> ConfigReport:
    first = rows[0]
    counts = {status: sum(1 for row in rows if row.status == status)
              for status in ("pending", "running", "done", "diverged", "failed")}
    counts["total"] = len(rows)
    finished = sum(counts[s] for s in FINISHED)
    if finished == len(rows):
        status = "completed"
    elif finished == 0 and counts["running"] == 0:
        status = "pending"
    else:
        status = "in_progress"
    with_result = [row for row in rows if row.wall_s is not None or row.status in ("done", "diverged")]
    finetune = [row.finetune_s for row in with_result if row.finetune_s is not None]
    inference = [row.inference_s for row in with_result if row.inference_s is not None]
    return ConfigReport(
        search=first.search, name=first.config, hash=first.config_hash, parameter=first.parameter,
        value=first.value, is_baseline=first.is_baseline, condition_frames=first.condition_frames, status=status,
        rows=counts, videos_completed=finished, metrics={m: estimate(_scores(rows, m)) for m in METRICS},
        finetune_s_mean=float(np.mean(finetune)) if finetune else None,
        inference_s_mean=float(np.mean(inference)) if inference else None,
        finetune_s_total=float(sum(finetune)), inference_s_total=float(sum(inference)),
        gpu_hours=sum(row.wall_s or 0.0 for row in with_result) / 3600.0,
    )


def _group(rows: list[TaskRow]) -> OrderedDict[str, OrderedDict[str, list[TaskRow]]]:
    """search -> config name -> rows, searches and configs in report order (rows are sorted)."""
    grouped: OrderedDict[str, OrderedDict[str, list[TaskRow]]] = OrderedDict()
    for row in rows:
        grouped.setdefault(row.search, OrderedDict()).setdefault(row.config, []).append(row)
    return grouped


def _search_report(name: str, configs: OrderedDict[str, list[TaskRow]],
                   no_finetune: dict[int, list[TaskRow]]) -> SearchReport:
    reports = [_config_report(rows) for rows in configs.values()]
    baseline = next((c for c in reports if c.is_baseline), None)
    for report in reports:
        rows = configs[report.name]
        reference_rows = no_finetune.get(report.condition_frames, [])
        for metric in METRICS:
            own = _scores(rows, metric)
            if baseline is not None:
                report.vs_baseline[metric] = compare(metric, own, _scores(configs[baseline.name], metric),
                                                     baseline.name)
            reference = f"no_finetune_cf_{report.condition_frames}"
            report.vs_no_finetune[metric] = compare(metric, own, _scores(reference_rows, metric), reference)
            trivial = {row.video: t for row in reference_rows if (t := row.trivial(metric)) is not None}
            report.vs_trivial[metric] = compare(metric, own, trivial, "trivial (last conditioning frame)")
    for kind in COMPARISONS:
        for metric in METRICS:
            tested = [(c, getattr(c, kind)[metric]) for c in reports
                      if metric in getattr(c, kind) and getattr(c, kind)[metric].p_value is not None
                      and not (kind == "vs_baseline" and c.is_baseline)]
            for (_, comparison), adjusted in zip(tested, holm([cmp.p_value for _, cmp in tested])):
                comparison.p_holm = adjusted
    best = {m: b for m in METRICS if (b := _best(m, reports, baseline)) is not None}
    return SearchReport(name=name, parameter=reports[0].parameter, baseline_config=baseline.name if baseline else None,
                        configs=reports, best=best)


def _best(metric: str, reports: list[ConfigReport], baseline: ConfigReport | None) -> Best | None:
    scored = [c for c in reports if c.metrics[metric].mean is not None]
    if not scored:
        return None
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    # A tie with the baseline goes to the baseline: an equal mean is no finding.
    top = max(scored, key=lambda c: (sign * (c.metrics[metric].mean or 0.0), c.is_baseline))
    mean = top.metrics[metric].mean or 0.0
    label = METRIC_LABELS[metric]
    shown = f"{top.name} = {fmt_metric(mean, metric)}{METRIC_UNITS[metric]}"
    partial = f"; partial: {top.metrics[metric].n} of {top.rows['total']} videos scored" if top.partial else ""
    if baseline is None:
        return Best(metric, top.name, top.value, mean, top.is_baseline, None, False,
                    f"best {label}: {shown}; this search has no baseline config to test against{partial}")
    if top.is_baseline:
        return Best(metric, top.name, top.value, mean, True, None, False,
                    f"best {label}: {shown}, the baseline itself: not significantly better than the "
                    f"baseline{partial}")
    cmp = top.vs_baseline[metric]
    better = cmp.mean_diff is not None and sign * cmp.mean_diff > 0
    significant = cmp.p_value is not None and cmp.p_value < ALPHA and better
    test = (f"{_signed(cmp.mean_diff, metric)} vs {baseline.name}, {cmp.improved}/{cmp.pairs} videos improved, "
            f"Wilcoxon p={fmt_p(cmp.p_value)}" + (f" (Holm {fmt_p(cmp.p_holm)})" if cmp.p_holm is not None else ""))
    verdict = "significantly better than the baseline" if significant else "not significantly better than the baseline"
    return Best(metric, top.name, top.value, mean, False, cmp.p_value, significant,
                f"best {label}: {shown}; {test}: {verdict}{partial}")


def compute(store: Store, now: float | None = None) -> tuple[Report, list[TaskRow]]:
    """The report's numbers and the rows they came from (no files written)."""
    rows = load_rows(store)
    grouped = _group(rows)
    no_finetune: dict[int, list[TaskRow]] = {}
    for row in rows:
        if row.search == BASELINE_INFERENCE:
            no_finetune.setdefault(row.condition_frames, []).append(row)
    searches = [_search_report(name, configs, no_finetune) for name, configs in grouped.items()
                if name != BASELINE_INFERENCE]
    inference = []
    for config_rows in grouped.get(BASELINE_INFERENCE, OrderedDict()).values():
        report = _config_report(config_rows)
        for metric in METRICS:
            trivial = {row.video: t for row in config_rows if (t := row.trivial(metric)) is not None}
            report.trivial[metric] = estimate(trivial)
            report.vs_trivial[metric] = compare(metric, _scores(config_rows, metric), trivial,
                                                "trivial (last conditioning frame)")
        inference.append(report)
    tasks = {row.task_id: row for row in rows}  # each task once, whatever the searches holding it
    totals = {status: sum(1 for row in tasks.values() if row.status == status)
              for status in ("pending", "running", "done", "diverged", "failed")}
    totals["total"] = len(tasks)
    totals["blocked"] = sum(1 for row in tasks.values() if row.blocked)
    measured = [m for m in METRICS if any(row.score(m) is not None for row in rows)]
    return Report(
        generated_at=time.time() if now is None else now, database=_redact(store.url),
        partial=totals["pending"] + totals["running"] > 0, rows=totals, metrics=measured,
        gpu_hours=sum(row.wall_s or 0.0 for row in tasks.values()) / 3600.0,
        searches=searches, baseline_inference=inference,
    ), rows


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ---------------------------------------------------------------- writing


def build_report(settings: Settings, store: Store, out: Path | None = None, now: float | None = None) -> Report:
    """Compute the report and (re)write summary.json, progress.json, per_video.csv, plots/ and
    report.html under `out` (default: the sweep's output folder)."""
    out = Path(out) if out is not None else settings.output_path()
    report, rows = compute(store, now)
    plots_dir = out / "plots"
    try:
        plots_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(plots_dir, err) from None
    files: dict[str, Path] = {}
    files["summary"] = _write(out / "summary.json", json.dumps(report.summary_json(), indent=2) + "\n")
    files["progress"] = _write(out / "progress.json", json.dumps(report.progress_json(), indent=2) + "\n")
    files["per_video"] = _write(out / "per_video.csv", per_video_csv(rows))
    plots = make_plots(report, rows)
    for name, png in plots.items():
        files[f"plot:{name}"] = _write(plots_dir / name, png)
    for stale in plots_dir.glob("*.png"):
        if stale.name not in plots:  # a search or metric that is gone: its old plot would mislead
            stale.unlink(missing_ok=True)
    strips = frame_strips(report, rows, settings)
    files["html"] = _write(out / "report.html", render_html(report, plots, strips))
    report.files = files
    return report


def _write(path: Path, data: str | bytes) -> Path:
    """Write to a temporary name beside `path`, then rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        raise _unwritable(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _unwritable(path: Path, err: OSError) -> OutputError:
    return OutputError(f"cannot write {path} ({err.strerror or err}): free space there or fix its permissions, "
                       "or write the report elsewhere with --out DIR")


def per_video_csv(rows: list[TaskRow]) -> str:
    """One row per task and search (the baseline config once per search), then the un-fine-tuned rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(getattr(row, "config" if column == "config" else column)) for column in CSV_COLUMNS])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: the CSV must reproduce summary.json exactly
    return str(value)


# ---------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def make_plots(report: Report, rows: list[TaskRow]) -> dict[str, bytes]:
    """PNG bytes by file name: metrics vs value, per-video deltas, and cost vs finetune_steps."""
    plots: dict[str, bytes] = {}
    metrics = report.metrics
    if not metrics:
        return plots
    inference = {c.condition_frames: c for c in report.baseline_inference}
    for search in report.searches:
        scored = [c for c in search.configs if any(c.metrics[m].n for m in metrics)]
        if not scored:
            continue
        plots[f"{_safe(search.name)}_metrics.png"] = _metrics_plot(search, scored, metrics, inference)
        if search.baseline_config is not None:
            plots[f"{_safe(search.name)}_deltas.png"] = _deltas_plot(search, rows, metrics)
        if search.parameter == "finetune_steps" and any(c.gpu_hours for c in search.configs):
            plots[f"{_safe(search.name)}_cost.png"] = _cost_plot(search)
    return plots


def _figure(width: float, height: float, bottom: float = 0.16) -> Any:
    """A pyplot-free figure (no global state, no GUI backend). Fixed margins: a layout engine
    would draw every figure twice, which doubles the report's time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.86, bottom=bottom, wspace=0.3)
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _metrics_plot(search: SearchReport, configs: list[ConfigReport], metrics: list[str],
                  inference: dict[int, ConfigReport]) -> bytes:
    fig = _figure(4.2 * len(metrics), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        points = [c for c in configs if c.metrics[metric].mean is not None]
        x = np.array([c.value for c in points])
        y = np.array([c.metrics[metric].mean for c in points], dtype=float)
        low = np.array([c.metrics[metric].ci_low for c in points], dtype=float)
        high = np.array([c.metrics[metric].ci_high for c in points], dtype=float)
        ax.errorbar(x, y, yerr=[y - low, high - y], fmt="o-", capsize=4, color="tab:blue",
                    label="fine-tuned (95% CI)")
        for c, xi, yi in zip(points, x, y):
            if c.is_baseline:
                ax.plot([xi], [yi], marker="*", markersize=16, color="tab:orange", linestyle="none",
                        label="baseline config")
            if c.partial:
                ax.annotate(f"{c.metrics[metric].n}/{c.rows['total']}", (xi, yi), textcoords="offset points",
                            xytext=(4, 6), fontsize=7, color="tab:red")
        refs = [(c.value, inference[c.condition_frames]) for c in points if c.condition_frames in inference]
        refs = [(v, r) for v, r in refs if r.metrics[metric].mean is not None]
        if refs:
            ax.plot([v for v, _ in refs], [r.metrics[metric].mean for _, r in refs], "s--", color="0.45",
                    label="no fine-tune")
        trivial = [(v, r.trivial[metric].mean) for v, r in refs if r.trivial.get(metric) is not None
                   and r.trivial[metric].mean is not None]
        if trivial:
            ax.plot([v for v, _ in trivial], [t for _, t in trivial], "x:", color="tab:green",
                    label="last frame repeated")
        if search.parameter == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(search.parameter)
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set_ylabel(f"{METRIC_LABELS[metric]}{METRIC_UNITS[metric]} ({better} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"search {search.name}: mean per config" + ("  (PARTIAL: sweep still running)" if search.partial
                                                             else ""))
    return _png(fig)


def _deltas_plot(search: SearchReport, rows: list[TaskRow], metrics: list[str]) -> bytes:
    by_config: dict[str, list[TaskRow]] = {}
    for row in rows:
        if row.search == search.name:
            by_config.setdefault(row.config, []).append(row)
    base = {m: _scores(by_config.get(search.baseline_config or "", []), m) for m in metrics}
    fig = _figure(max(4.5, 0.9 * len(search.configs) + 1.5) * len(metrics), 4.0, bottom=0.22)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    rng = np.random.default_rng(0)  # jitter only: the same picture every run
    for ax, metric in zip(axes, metrics):
        labels = []
        for i, config in enumerate(search.configs):
            own = _scores(by_config.get(config.name, []), metric)
            videos = sorted(set(own) & set(base[metric]))
            diffs = np.array([own[v] - base[metric][v] for v in videos])
            labels.append(config.name + (" *" if config.is_baseline else "") + (" (partial)" if config.partial else ""))
            if len(diffs):
                ax.scatter(i + rng.uniform(-0.12, 0.12, len(diffs)), diffs, s=14, alpha=0.7, color="tab:blue")
                cmp = config.vs_baseline[metric]
                if cmp.mean_diff is not None and cmp.ci_low is not None and cmp.ci_high is not None:
                    ax.errorbar([i + 0.28], [cmp.mean_diff], yerr=[[cmp.mean_diff - cmp.ci_low],
                                                                    [cmp.ci_high - cmp.mean_diff]],
                                fmt="D", color="black", capsize=3, markersize=4)
                if not config.is_baseline:
                    ax.annotate(f"p={fmt_p(cmp.p_value)}\n{cmp.improved}/{cmp.pairs} better", (i, 1.0),
                                xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7)
        ax.axhline(0.0, color="0.4", linewidth=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set_ylabel(f"{METRIC_LABELS[metric]} minus baseline ({better} is better)")
        ax.margins(y=0.25)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"search {search.name}: per-video difference from {search.baseline_config} "
                 "(dots: videos; diamond: mean, 95% CI)" + ("  PARTIAL" if search.partial else ""))
    return _png(fig)


def _cost_plot(search: SearchReport) -> bytes:
    fig = _figure(5.5, 3.6, bottom=0.15)
    fig.subplots_adjust(left=0.16, right=0.95)
    ax = fig.subplots()
    configs = [c for c in search.configs if c.gpu_hours]
    x = [c.value for c in configs]
    per_video = [c.gpu_hours * 60.0 / max(1, c.rows["done"] + c.rows["diverged"]) for c in configs]
    finetune = [(c.finetune_s_mean or 0.0) / 60.0 for c in configs]
    ax.plot(x, per_video, "o-", label="GPU-minutes per video (wall)")
    ax.plot(x, finetune, "s--", label="fine-tune minutes per video")
    for c, xi, yi in zip(configs, x, per_video):
        ax.annotate(f"{c.gpu_hours * 60.0:.3g} min total", (xi, yi), textcoords="offset points", xytext=(0, 6),
                    fontsize=7, ha="center")
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel(search.parameter)
    ax.set_ylabel("GPU-minutes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"search {search.name}: cost" + ("  (PARTIAL)" if search.partial else ""))
    return _png(fig)


# ---------------------------------------------------------------- frame strips


@dataclass
class Strip:
    """One video under one config: truth, un-fine-tuned and fine-tuned frames after condition_frames."""

    config: str
    video: str
    category: str
    caption: str
    png: bytes


def frame_strips(report: Report, rows: list[TaskRow], settings: Settings) -> dict[str, list[Strip]]:
    """Strips per config hash for up to STRIP_VIDEOS scored videos, taken category by category
    (first video of each category, then the second, ...), so that every config shows the same
    videos as far as they are done and the strips cover more than one kind of motion."""
    data = settings.data
    inference = {(row.condition_frames, row.video): row for row in rows if row.search == BASELINE_INFERENCE}
    per_category: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: r.video):
        if row.video not in per_category.setdefault(row.category, []):
            per_category[row.category].append(row.video)
    order = {video: (rank, category) for category, videos in per_category.items()
             for rank, video in enumerate(videos)}
    chosen: dict[str, dict[str, TaskRow]] = {}
    for row in sorted(rows, key=lambda r: order[r.video]):
        if row.search != BASELINE_INFERENCE and row.status == "done":
            picked = chosen.setdefault(row.config_hash, {})
            if len(picked) < STRIP_VIDEOS:
                picked.setdefault(row.video, row)  # the baseline config is met once per search
    truth_cache: dict[str, np.ndarray | None] = {}
    strips: dict[str, list[Strip]] = {}
    for config_hash, picked in chosen.items():
        for row in picked.values():
            if row.video_path not in truth_cache:
                truth_cache[row.video_path] = _try(lambda: _read_truth(row.video_path, data.num_frames,
                                                                       data.height, data.width))
            reference = inference.get((row.condition_frames, row.video))
            plain = _try(lambda: _load_frames(reference.artifact_dir, settings)) if reference else None
            tuned = _try(lambda: _load_frames(row.artifact_dir, settings))
            png = _strip_png(truth_cache[row.video_path], plain, tuned, row.condition_frames)
            parts = []
            for m in report.metrics:
                if (score := row.score(m)) is not None:
                    plain_score = reference.score(m) if reference else None
                    parts.append(f"{METRIC_LABELS[m]} fine-tuned {fmt_metric(score, m)}"
                                 + (f", no fine-tune {fmt_metric(plain_score, m)}" if plain_score is not None else ""))
            strips.setdefault(config_hash, []).append(Strip(row.config, row.video, row.category, "; ".join(parts), png))
    return strips


def _try(load: Any) -> np.ndarray | None:
    """Frames, or None when a file is gone: the strip shows a grey 'missing' row instead."""
    try:
        return load()
    except Exception:
        return None


def _read_truth(path: str, num_frames: int, height: int, width: int) -> np.ndarray:
    from hparray.videos import read_video

    return read_video(path, num_frames, height, width)


def _load_frames(artifact_dir: str | None, settings: Settings) -> np.ndarray | None:
    if not artifact_dir:
        return None
    folder = Path(artifact_dir)
    if not folder.is_absolute():
        folder = settings.config_dir.parent / folder
    with np.load(folder / "frames.npz") as data:
        return np.asarray(data["frames"], dtype=np.float32)


def _strip_png(truth: np.ndarray | None, plain: np.ndarray | None, tuned: np.ndarray | None, cf: int) -> bytes:
    """A labelled grid: rows truth / no fine-tune / fine-tuned, columns frames after condition_frames."""
    from PIL import Image, ImageDraw

    known = next((a for a in (truth, tuned, plain) if a is not None), None)
    length = known.shape[0] if known is not None else cf + 1
    h, w = (known.shape[1], known.shape[2]) if known is not None else (STRIP_HEIGHT, STRIP_HEIGHT)
    scale = STRIP_HEIGHT / h
    fh, fw = STRIP_HEIGHT, max(1, round(w * scale))
    indices = sorted({int(i) for i in np.linspace(cf, length - 1, STRIP_FRAMES).round()}) if length > cf else []
    label_w, header_h, gap = 92, 16, 3
    width = label_w + len(indices) * (fw + gap)
    height = header_h + 3 * (fh + gap)
    canvas = Image.new("RGB", (max(width, label_w + 10), height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, t in enumerate(indices):
        draw.text((label_w + col * (fw + gap) + 2, 2), f"frame {t}", fill="black")
    for r, (label, frames) in enumerate((("truth", truth), ("no fine-tune", plain), ("fine-tuned", tuned))):
        top = header_h + r * (fh + gap)
        draw.text((4, top + fh // 2 - 6), label if frames is not None else f"{label}\n(missing)", fill="black")
        for col, t in enumerate(indices):
            left = label_w + col * (fw + gap)
            if frames is None or t >= len(frames):
                draw.rectangle([left, top, left + fw - 1, top + fh - 1], fill=(200, 200, 200))
                continue
            pixels = (np.clip(frames[t], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
            tile = Image.fromarray(pixels).resize((fw, fh), resample)
            canvas.paste(tile, (left, top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- formatting and the page


def fmt_metric(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def _signed(value: float | None, metric: str) -> str:
    """A difference to 3 significant digits: a tiny difference must not print as +0.0000."""
    if value is None:
        return "-"
    return f"{value:+.3g}{METRIC_UNITS[metric]}"


def fmt_p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>hparray report{% if report.partial %} (partial){% endif %}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
tr.baseline td { background: #fff8e6; } td.best { font-weight: bold; color: #0a6b1f; }
.partial { background: #fde8e8; border: 1px solid #d66; padding: 0.6em 1em; font-weight: bold; }
.tag { color: #b22; font-size: 11px; } .sig { color: #0a6b1f; } .ns { color: #7a5b00; }
.strips { display: flex; flex-wrap: wrap; gap: 1.2em; } figure { margin: 0; } figcaption { font-size: 12px; }
img.plot { max-width: 100%; } details { margin: 0.5em 0 1em; } .muted { color: #666; }
</style></head><body>
<h1>What the sweep found</h1>
<p class="muted">generated {{ generated }} from {{ report.database }}; {{ report.rows.total }} rows:
{{ report.rows.done }} done, {{ report.rows.diverged }} diverged, {{ report.rows.failed }} failed,
{{ report.rows.running }} running, {{ report.rows.pending }} pending;
{{ "%.2f"|format(report.gpu_hours) }} GPU-hours spent.</p>
{% if report.partial %}<p class="partial" id="partial-banner">PARTIAL RESULTS: the sweep is still running
({{ report.rows.pending + report.rows.running }} of {{ report.rows.total }} rows not finished
{%- if report.rows.blocked %},
{{ report.rows.blocked }} of them blocked behind a failed or diverged un-fine-tuned row until it is retried{% endif %}).
Configs marked "partial" are scored on the videos finished so far; every number here will change.</p>{% endif %}
{% if not report.searches %}<p>No fine-tune rows yet: plan a search first.</p>{% endif %}

<h2>How to read this</h2>
<ul>
<li>Every config scores the same videos, so comparisons are <b>paired per video</b>: &Delta; is the mean of
per-video differences (config minus reference), "better" counts videos where the config wins
(higher PSNR/SSIM, lower LPIPS).</li>
<li>Means carry a {{ (confidence * 100)|int }}% percentile bootstrap CI ({{ resamples }} resamples, seed {{ seed }}).
p is the two-sided Wilcoxon signed-rank test of the per-video differences (n/a below 2 videos, 1 when all differences
are 0); Holm-adjusted p corrects for testing every value of a search. A best value whose p &ge; {{ alpha }} is
<b>not significantly better than the baseline</b>.</li>
<li>References: the search's baseline config (marked *), the un-fine-tuned model ("no fine-tune", same video and
condition_frames) and the trivial predictor that repeats the last conditioning frame.</li>
<li>Diverged and failed rows are counted, not scored.</li>
</ul>

{% for search in report.searches %}
<h2 id="search-{{ search.name }}">Search {{ search.name }}: {{ search.parameter }}
{% if search.partial %}<span class="tag">(partial)</span>{% endif %}</h2>
<ul>{% for metric, best in search.best.items() if metric in report.metrics %}
<li class="{{ 'sig' if best.significant else 'ns' }}">{{ best.statement }}</li>{% endfor %}</ul>
{% for metric in report.metrics %}
<table><caption style="text-align:left"><b>{{ labels[metric] }}</b>
({{ 'higher' if higher[metric] else 'lower' }} is better; &#9733; best mean)</caption>
<tr><th class="name">config</th><th>{{ search.parameter }}</th><th>videos</th><th>mean</th><th>std</th><th>95% CI</th>
<th>&Delta; vs baseline [CI]</th><th>p</th><th>Holm p</th><th>better</th>
<th>&Delta; vs no fine-tune</th><th>p</th><th>better</th><th>&Delta; vs trivial</th><th>p</th><th>better</th></tr>
{% for c in search.configs %}{% set e = c.metrics[metric] %}
<tr class="{{ 'baseline' if c.is_baseline else '' }}">
<td class="name">{{ c.name }}{% if c.is_baseline %} *{% endif %}
{% if c.status == 'pending' %}<span class="tag">pending</span>
{% elif c.partial %}<span class="tag">partial</span>{% endif %}</td>
<td>{{ value(c.value) }}</td><td>{{ e.n }}/{{ c.rows.total }}</td>
{% if search.best.get(metric) and search.best[metric].config == c.name %}
<td class="best">&#9733; {{ fmt(e.mean, metric) }}</td>
{% else %}<td>{{ fmt(e.mean, metric) }}</td>{% endif %}
<td>{{ fmt(e.std, metric) }}</td><td>{{ ci(e.ci_low, e.ci_high, metric) }}</td>
{% set b = c.vs_baseline.get(metric) %}
<td>{% if b %}{{ signed(b.mean_diff, metric) }} {{ ci_diff(b.ci_low, b.ci_high) }}{% else %}-{% endif %}</td>
<td>{{ p(b.p_value) if b else '-' }}</td><td>{{ p(b.p_holm) if b else '-' }}</td>
<td>{% if b %}{{ b.improved }}/{{ b.pairs }}{% else %}-{% endif %}</td>
{% for kind in ('vs_no_finetune', 'vs_trivial') %}{% set x = c[kind].get(metric) %}
<td>{{ signed(x.mean_diff, metric) if x else '-' }}</td><td>{{ p(x.p_value) if x else '-' }}</td>
<td>{% if x %}{{ x.improved }}/{{ x.pairs }}{% else %}-{% endif %}</td>{% endfor %}
</tr>{% endfor %}
</table>
{% endfor %}
<table><caption style="text-align:left"><b>Rows and cost</b></caption>
<tr><th class="name">config</th><th>status</th><th>done</th><th>diverged</th><th>failed</th><th>running</th>
<th>pending</th>
<th>fine-tune s (mean)</th><th>inference s (mean)</th><th>GPU-hours</th></tr>
{% for c in search.configs %}
<tr class="{{ 'baseline' if c.is_baseline else '' }}"><td class="name">{{ c.name }}</td><td>{{ c.status }}</td>
<td>{{ c.rows.done }}</td><td>{{ c.rows.diverged }}</td><td>{{ c.rows.failed }}</td><td>{{ c.rows.running }}</td>
<td>{{ c.rows.pending }}</td><td>{{ seconds(c.finetune_s_mean) }}</td><td>{{ seconds(c.inference_s_mean) }}</td>
<td>{{ "%.3f"|format(c.gpu_hours) }}</td></tr>{% endfor %}
</table>
{% for name in plot_names(search) %}
<p><img class="plot" alt="{{ name }}" src="{{ plots[name] }}"></p>{% endfor %}
<h3>Frames after the conditioning frames: truth, un-fine-tuned, fine-tuned</h3>
{% for c in search.configs %}{% if strips.get(c.hash) %}
<h4>{{ c.name }}{% if c.is_baseline %} * (baseline){% endif %}</h4>
<div class="strips">{% for s in strips[c.hash] %}
<figure><img class="strip" alt="frames {{ c.name }} {{ s.video }}" src="{{ s.uri }}">
<figcaption>{{ s.video }} ({{ s.category }}): {{ s.caption }}</figcaption></figure>{% endfor %}</div>
{% endif %}{% endfor %}
{% endfor %}

{% if report.baseline_inference %}
<h2 id="baseline-inference">Un-fine-tuned inference</h2>
<table><tr><th class="name">config</th><th>status</th><th>videos</th>
{% for metric in report.metrics %}<th>{{ labels[metric] }} mean [95% CI]</th><th>last frame repeated</th>
<th>&Delta; vs trivial</th><th>p</th><th>better</th>{% endfor %}
<th>GPU-hours</th></tr>
{% for c in report.baseline_inference %}<tr><td class="name">{{ c.name }}</td><td>{{ c.status }}</td>
<td>{{ c.rows.done }}/{{ c.rows.total }}</td>
{% for metric in report.metrics %}{% set e = c.metrics[metric] %}{% set x = c.vs_trivial[metric] %}
<td>{{ fmt(e.mean, metric) }} {{ ci(e.ci_low, e.ci_high, metric) }}</td>
<td>{{ fmt(c.trivial[metric].mean, metric) }}</td>
<td>{{ signed(x.mean_diff, metric) }}</td>
<td>{{ p(x.p_value) }}</td><td>{{ x.improved }}/{{ x.pairs }}</td>{% endfor %}
<td>{{ "%.3f"|format(c.gpu_hours) }}</td></tr>{% endfor %}
</table>
{% endif %}
<p class="muted">Files beside this page: summary.json (every number above), progress.json, per_video.csv (one row
per task and search), plots/.</p>
</body></html>
"""


def render_html(report: Report, plots: dict[str, bytes], strips: dict[str, list[Strip]]) -> str:
    """One self-contained page: tables, plots and frame strips, images as base64 data URIs."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    template = env.from_string(HTML_TEMPLATE)
    uris = {name: _data_uri(png) for name, png in plots.items()}

    def plot_names(search: SearchReport) -> list[str]:
        names = [f"{_safe(search.name)}_{kind}.png" for kind in ("metrics", "deltas", "cost")]
        return [name for name in names if name in uris]

    def ci(low: float | None, high: float | None, metric: str) -> str:
        return "-" if low is None or high is None else f"[{fmt_metric(low, metric)}, {fmt_metric(high, metric)}]"

    def ci_diff(low: float | None, high: float | None) -> str:
        return "-" if low is None or high is None else f"[{low:+.3g}, {high:+.3g}]"

    strip_views = {key: [{"video": s.video, "category": s.category, "caption": s.caption, "uri": _data_uri(s.png)}
                         for s in value] for key, value in strips.items()}
    return template.render(
        report=report, generated=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.generated_at)),
        labels=METRIC_LABELS, higher=HIGHER_IS_BETTER, plots=uris, strips=strip_views, plot_names=plot_names,
        fmt=fmt_metric, signed=_signed, p=fmt_p, ci=ci, ci_diff=ci_diff, confidence=CONFIDENCE,
        resamples=BOOTSTRAP_RESAMPLES,
        seed=BOOTSTRAP_SEED, alpha=ALPHA, value=_value,
        seconds=lambda s: "-" if s is None else f"{s:.1f}",
    )


def _value(value: float) -> str:
    return format_value(int(value)) if float(value).is_integer() and value >= 1 else format_value(value)
