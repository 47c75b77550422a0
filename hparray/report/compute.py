"""The report's numbers: per-config estimates, paired comparisons with the references, the best
value of each search and whether it beat the baseline (no files here: see `build_report`)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hparray.metrics import HIGHER_IS_BETTER, METRIC_LABELS, METRIC_UNITS, METRICS
from hparray.report.format import fmt_metric, fmt_p, signed
from hparray.report.records import BASELINE_INFERENCE, TaskRow, load_rows, scores
from hparray.report.stats import (
    ALPHA,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    Comparison,
    Estimate,
    compare,
    estimate,
    holm,
)
from hparray.store import Store, redact_url

FINISHED = ("done", "diverged", "failed")
COMPARISONS = {
    "vs_baseline": "the search's baseline config",
    "vs_no_finetune": "un-fine-tuned inference (same video, same condition_frames)",
    "vs_trivial": "last conditioning frame repeated",
}



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
        rows=counts, videos_completed=finished, metrics={m: estimate(scores(rows, m)) for m in METRICS},
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
            own = scores(rows, metric)
            if baseline is not None:
                report.vs_baseline[metric] = compare(metric, own, scores(configs[baseline.name], metric),
                                                     baseline.name)
            reference = f"no_finetune_cf_{report.condition_frames}"
            report.vs_no_finetune[metric] = compare(metric, own, scores(reference_rows, metric), reference)
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
    test = (f"{signed(cmp.mean_diff, metric)} vs {baseline.name}, {cmp.improved}/{cmp.pairs} videos improved, "
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
            report.vs_trivial[metric] = compare(metric, scores(config_rows, metric), trivial,
                                                "trivial (last conditioning frame)")
        inference.append(report)
    tasks = {row.task_id: row for row in rows}  # each task once, whatever the searches holding it
    totals = {status: sum(1 for row in tasks.values() if row.status == status)
              for status in ("pending", "running", "done", "diverged", "failed")}
    totals["total"] = len(tasks)
    totals["blocked"] = sum(1 for row in tasks.values() if row.blocked)
    measured = [m for m in METRICS if any(row.score(m) is not None for row in rows)]
    return Report(
        generated_at=time.time() if now is None else now, database=redact_url(store.url),
        partial=totals["pending"] + totals["running"] > 0, rows=totals, metrics=measured,
        gpu_hours=sum(row.wall_s or 0.0 for row in tasks.values()) / 3600.0,
        searches=searches, baseline_inference=inference,
    ), rows

