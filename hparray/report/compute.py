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

from hparray.confirm import CONFIRM, JOINER
from hparray.metrics import HIGHER_IS_BETTER, METRIC_LABELS, METRIC_UNITS, METRICS
from hparray.report.format import fmt_metric, fmt_p, signed
from hparray.report.records import BASELINE_INFERENCE, TaskRow, load_rows, scores, window_scores
from hparray.report.stats import (
    ALPHA,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    Comparison,
    Estimate,
    better_p,
    compare,
    estimate,
    holm,
    search_verdict,
)
from hparray.report.stopped import StoppingReport, stopping_report
from hparray.store import Store, redact_url
from hparray.store.stopping import stops

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
    stopped: str = ""  # why sequential stopping stopped it (report.stopped), when it did

    @property
    def partial(self) -> bool:
        """Rows still to run; a stopped config (status 'stopped') has none: its skipped rows will not run."""
        return self.status not in ("completed", "stopped")


@dataclass
class Best:
    """The best config of a search for one metric, and whether it beat the baseline significantly."""

    metric: str
    config: str
    value: float
    mean: float
    is_baseline: bool
    p_value: float | None  # one-sided, unadjusted
    p_holm: float | None  # Holm over the search's planned non-baseline configs: what decides
    family: int
    significant: bool
    statement: str


@dataclass
class WindowReport:
    """A search whose configs condition on different frame counts, scored again on the same frames
    for every config: those after its largest condition_frames (from the stored per-frame scores)."""

    first_frame: int
    last_frame: int
    metrics: dict[str, dict[str, Estimate]]  # config -> metric -> estimate over the window
    vs_baseline: dict[str, dict[str, Comparison]]
    best: dict[str, Best]


@dataclass
class SearchReport:
    name: str
    parameter: str
    baseline_config: str | None
    configs: list[ConfigReport]
    best: dict[str, Best]
    common_window: WindowReport | None = None

    @property
    def partial(self) -> bool:
        return any(config.partial for config in self.configs)


@dataclass
class ConfirmEffect:
    """One metric of the confirmation: the combination against the baseline, beside the effects of
    the single values it combines (each measured in its own search, against the same baseline)."""

    metric: str
    combined: Comparison
    p_better: float | None  # one-sided Wilcoxon, the combination better than the baseline
    singles: dict[str, float | None]  # search -> its chosen config's mean difference from the baseline
    sum_of_singles: float | None
    statement: str


@dataclass
class Confirmation:
    combination: str
    chosen: dict[str, str]  # search -> the config whose value the combination takes
    effects: dict[str, ConfirmEffect]
    caveat: str = ("the values were chosen on these same videos, so the combination's effect here is an "
                   "optimistic estimate; a confirmation on held-out videos (another seed or source) is unbiased")


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
    confirmation: Confirmation | None = None
    stopping: StoppingReport | None = None
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
                "common_window": _plain(s.common_window),
            } for s in self.searches},
            BASELINE_INFERENCE: {c.name: _config_json(c) for c in self.baseline_inference},
            "confirmation": _plain(self.confirmation),
            "stopping": _plain(self.stopping),
        }

    def progress_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        """progress.json: {search: {config: {"status", metric means when completed, videos_completed
        when in_progress or stopped}}}; un-fine-tuned inference under 'baseline_inference'.

        completed: every row finished (done, diverged or failed); stopped: every row finished or
        skipped by sequential stopping; pending: none finished or running; videos_completed counts
        finished rows, so it reaches the total exactly when the config is completed (its means use
        the done rows only)."""
        progress: dict[str, dict[str, dict[str, Any]]] = {}
        groups = [(s.name, s.configs) for s in self.searches] + [(BASELINE_INFERENCE, self.baseline_inference)]
        for search, configs in groups:
            entries: dict[str, dict[str, Any]] = {}
            for c in configs:
                entry: dict[str, Any] = {"status": c.status}
                if c.status == "completed":
                    entry.update({m: c.metrics[m].mean for m in METRICS})
                elif c.status in ("in_progress", "stopped"):
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
        "multiple_comparisons": "p_holm of a comparison: two-sided p Holm-adjusted over the configs of a search "
                                "(per metric and reference), descriptive",
        "verdict": "the best mean of a search (a tie goes to the baseline) is significantly better when its "
                   "one-sided Wilcoxon p (config better than the baseline), Holm-adjusted over the search's planned "
                   "non-baseline configs for that metric (untestable ones count as p = 1), is below alpha and its "
                   "mean difference is in the better direction: a family-wise error rate of at most alpha per "
                   "(search, metric) verdict (docs/statistics.md)",
        "alpha": ALPHA,
        "improved": "videos whose metric beats the reference's: higher PSNR/SSIM, lower LPIPS",
        "references": COMPARISONS,
        "gpu_hours": "sum of wall_s of the rows with a result, divided by 3600",
        "stopping": "opt-in sequential stopping (stopping: in base.yaml): from min_videos paired videos on, after "
                    "each video, a fine-tune config whose one-sided exact Wilcoxon p (config worse than its search's "
                    "baseline) is below alpha / K (K = planned videos - min_videos + 1 looks: Bonferroni over the "
                    "looks) and whose mean difference is worse has its pending rows skipped; gpu_hours_saved = the "
                    "skipped rows times the mean measured wall time of done rows of their kind (else their estimate)",
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
              for status in ("pending", "running", "done", "diverged", "failed", "skipped")}
    counts["total"] = len(rows)
    counts["retried"] = sum(1 for row in rows if row.retried)
    finished = sum(counts[s] for s in FINISHED)
    if finished == len(rows):
        status = "completed"
    elif counts["skipped"] and finished + counts["skipped"] == len(rows):
        status = "stopped"
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
    best = {m: b for m in METRICS
            if (b := _best(m, reports, baseline, {c.name: scores(configs[c.name], m) for c in reports},
                           {c.name: c.metrics[m] for c in reports},
                           {c.name: c.vs_baseline[m] for c in reports if m in c.vs_baseline})) is not None}
    return SearchReport(name=name, parameter=reports[0].parameter, baseline_config=baseline.name if baseline else None,
                        configs=reports, best=best, common_window=_common_window(reports, baseline, configs))


def _best(metric: str, reports: list[ConfigReport], baseline: ConfigReport | None,
          per_video: dict[str, dict[str, float]], estimates: dict[str, Estimate],
          comparisons: dict[str, Comparison], window: str = "") -> Best | None:
    """The best mean of a search for `metric` and its verdict (`stats.search_verdict`), from each
    config's per-video scores (`per_video`), estimates and comparisons with the baseline."""
    scored = [c for c in reports if estimates[c.name].mean is not None]
    if not scored:
        return None
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    # A tie with the baseline goes to the baseline: an equal mean is no finding.
    top = max(scored, key=lambda c: (sign * (estimates[c.name].mean or 0.0), c.is_baseline))
    label = METRIC_LABELS[metric] + window
    partial = f"; partial: {estimates[top.name].n} of {top.rows['total']} videos scored" if top.partial else ""
    if top.status == "stopped":
        partial = f"; stopped by sequential stopping after {estimates[top.name].n} of {top.rows['total']} videos"
    if baseline is None:
        mean = estimates[top.name].mean or 0.0
        return Best(metric, top.name, top.value, mean, top.is_baseline, None, None, 0, False,
                    f"best {label}: {top.name} = {fmt_metric(mean, metric)}{METRIC_UNITS[metric]}; this search has "
                    f"no baseline config to test against{partial}")
    reference = per_video[baseline.name]
    differences = {c.name: np.array([per_video[c.name][v] - reference[v]
                                     for v in sorted(set(per_video[c.name]) & set(reference))])
                   for c in reports if not c.is_baseline}
    verdict = search_verdict(differences, {c.name: estimates[c.name].mean or 0.0 for c in scored},
                             baseline.name, metric)
    top = next(c for c in scored if c.name == verdict.config)
    mean = estimates[top.name].mean or 0.0
    shown = f"{top.name} = {fmt_metric(mean, metric)}{METRIC_UNITS[metric]}"
    if top.is_baseline:
        return Best(metric, top.name, top.value, mean, True, None, None, verdict.family, False,
                    f"best {label}: {shown}, the baseline itself: not significantly better than the "
                    f"baseline{partial}")
    cmp = comparisons[top.name]
    test = (f"{signed(cmp.mean_diff, metric)} vs {baseline.name}, {cmp.improved}/{cmp.pairs} videos improved, "
            f"one-sided Wilcoxon p={fmt_p(verdict.p_value)} unadjusted, Holm over {verdict.family} configs "
            f"p={fmt_p(verdict.p_holm)}")
    said = ("significantly better than the baseline" if verdict.significant
            else "not significantly better than the baseline")
    return Best(metric, top.name, top.value, mean, False, verdict.p_value, verdict.p_holm, verdict.family,
                verdict.significant, f"best {label}: {shown}; {test}: {said} (family-wise alpha {ALPHA}){partial}")


def _common_window(reports: list[ConfigReport], baseline: ConfigReport | None,
                   configs: OrderedDict[str, list[TaskRow]]) -> WindowReport | None:
    """The search on the frames after its largest condition_frames, when its configs differ in it."""
    frames = {c.condition_frames for c in reports}
    if len(frames) < 2:
        return None
    last = max((max(row.frames(m)) for rows in configs.values() for row in rows for m in METRICS
                if row.frames(m)), default=None)
    first = max(frames)
    if last is None or last < first:
        return None
    metrics: dict[str, dict[str, Estimate]] = {c.name: {} for c in reports}
    vs_baseline: dict[str, dict[str, Comparison]] = {c.name: {} for c in reports}
    best = {}
    for metric in METRICS:
        per_video = {c.name: window_scores(configs[c.name], metric, first, last) for c in reports}
        for c in reports:
            metrics[c.name][metric] = estimate(per_video[c.name])
            if baseline is not None:
                vs_baseline[c.name][metric] = compare(metric, per_video[c.name], per_video[baseline.name],
                                                      baseline.name)
        found = _best(metric, reports, baseline, per_video, {c.name: metrics[c.name][metric] for c in reports},
                      {c.name: vs_baseline[c.name][metric] for c in reports if metric in vs_baseline[c.name]},
                      window=f" on frames {first}-{last}")
        if found is not None:
            best[metric] = found
    return WindowReport(first, last, metrics, vs_baseline, best)


def _confirmation(searches: list[SearchReport], rows: list[TaskRow]) -> Confirmation | None:
    """The confirm search (hparray.confirm) against the sum of the single-factor effects."""
    confirm = next((s for s in searches if s.name == CONFIRM), None)
    combo = next((c for c in confirm.configs if not c.is_baseline), None) if confirm else None
    if confirm is None or combo is None:
        return None
    chosen_names = combo.name.split(JOINER)
    others = {s.name: s for s in searches if s.name != CONFIRM}
    chosen = {name: next((c for c in chosen_names if any(cfg.name == c for cfg in s.configs)), "")
              for name, s in others.items()}
    effects = {}
    combo_rows = [row for row in rows if row.search == CONFIRM and row.config == combo.name]
    base_rows = [row for row in rows if row.search == CONFIRM and row.is_baseline]
    for metric in METRICS:
        cmp = combo.vs_baseline.get(metric)
        if cmp is None or cmp.mean_diff is None:
            continue
        own, reference = scores(combo_rows, metric), scores(base_rows, metric)
        p = better_p(np.array([own[v] - reference[v] for v in sorted(set(own) & set(reference))]), metric)
        singles: dict[str, float | None] = {}
        for name, config_name in chosen.items():
            config = next((c for c in others[name].configs if c.name == config_name), None)
            diff = config.vs_baseline.get(metric) if config is not None else None
            singles[name] = 0.0 if config is not None and config.is_baseline else (diff.mean_diff if diff else None)
        total = sum(v for v in singles.values() if v is not None) if all(v is not None for v in singles.values()) \
            else None
        effects[metric] = ConfirmEffect(metric, cmp, p, singles, total,
                                        _confirm_statement(metric, combo.name, cmp, p, singles, total))
    return Confirmation(combo.name, chosen, effects)


def _confirm_statement(metric: str, name: str, cmp: Comparison, p: float | None, singles: dict[str, float | None],
                       total: float | None) -> str:
    label = METRIC_LABELS[metric]
    head = (f"{label}: {name} {signed(cmp.mean_diff, metric)} vs the baseline "
            f"[{signed(cmp.ci_low, metric)}, {signed(cmp.ci_high, metric)}], {cmp.improved}/{cmp.pairs} videos "
            f"improved, one-sided Wilcoxon p={fmt_p(p)}")
    if total is None or cmp.ci_low is None or cmp.ci_high is None:
        return head
    parts = ", ".join(f"{search} {signed(v, metric)}" for search, v in singles.items())
    if cmp.ci_low <= total <= cmp.ci_high:
        how = "inside the combination's CI: consistent with effects that add up"
    elif (total > cmp.ci_high) == HIGHER_IS_BETTER[metric]:
        how = "better than the combination's CI: together the values give less than the sum of their effects"
    else:
        how = "worse than the combination's CI: together the values give more than the sum of their effects"
    return f"{head}; the single-value effects sum to {signed(total, metric)} ({parts}), {how}"


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
              for status in ("pending", "running", "done", "diverged", "failed", "skipped")}
    stopping = stopping_report(rows, stops(store))
    for search in searches:
        for config in search.configs:
            if stopping is not None and config.hash in stopping.configs:
                config.stopped = stopping.configs[config.hash].statement
    totals["total"] = len(tasks)
    totals["blocked"] = sum(1 for row in tasks.values() if row.blocked)
    totals["retried"] = sum(1 for row in tasks.values() if row.retried)
    measured = [m for m in METRICS if any(row.score(m) is not None for row in rows)]
    return Report(
        generated_at=time.time() if now is None else now, database=redact_url(store.url),
        partial=totals["pending"] + totals["running"] > 0, rows=totals, metrics=measured,
        gpu_hours=sum(row.wall_s or 0.0 for row in tasks.values()) / 3600.0,
        searches=searches, baseline_inference=inference, confirmation=_confirmation(searches, rows),
        stopping=stopping,
    ), rows

