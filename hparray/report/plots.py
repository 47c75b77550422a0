"""The report's plots: per search, each config's mean with its CI, the paired differences from
the baseline per video, and the cost; PNG bytes, written by `build_report`."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from hparray.metrics import HIGHER_IS_BETTER, METRIC_LABELS, METRIC_UNITS
from hparray.report.compute import ConfigReport, Report, SearchReport
from hparray.report.format import fmt_p
from hparray.report.records import TaskRow, scores


def safe_name(name: str) -> str:
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
        plots[f"{safe_name(search.name)}_metrics.png"] = _metrics_plot(search, scored, metrics, inference)
        if search.baseline_config is not None:
            plots[f"{safe_name(search.name)}_deltas.png"] = _deltas_plot(search, rows, metrics)
        if any(row.per_frame for row in rows if row.search == search.name):
            plots[f"{safe_name(search.name)}_frames.png"] = _frames_plot(search, rows, metrics)
        if search.parameter == "finetune_steps" and any(c.gpu_hours for c in search.configs):
            plots[f"{safe_name(search.name)}_cost.png"] = _cost_plot(search)
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
    base = {m: scores(by_config.get(search.baseline_config or "", []), m) for m in metrics}
    fig = _figure(max(4.5, 0.9 * len(search.configs) + 1.5) * len(metrics), 4.0, bottom=0.22)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    rng = np.random.default_rng(0)  # jitter only: the same picture every run
    for ax, metric in zip(axes, metrics):
        labels = []
        for i, config in enumerate(search.configs):
            own = scores(by_config.get(config.name, []), metric)
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


def _mean_curve(rows: list[TaskRow], metric: str, trivial: bool = False) -> tuple[list[int], list[float]]:
    """Frame index -> mean over the rows' videos of that frame's metric."""
    by_frame: dict[int, list[float]] = {}
    for row in rows:
        for frame, value in row.frames(metric, trivial).items():
            by_frame.setdefault(frame, []).append(value)
    frames = sorted(by_frame)
    return frames, [float(np.mean(by_frame[f])) for f in frames]


def _frames_plot(search: SearchReport, rows: list[TaskRow], metrics: list[str]) -> bytes:
    """Each config's mean metric against the frame index, with the un-fine-tuned model and the
    trivial predictor at the baseline's condition_frames (and the common window, if any)."""
    by_config: dict[str, list[TaskRow]] = {}
    for row in rows:
        if row.search == search.name:
            by_config.setdefault(row.config, []).append(row)
    base_cf = next((c.condition_frames for c in search.configs if c.is_baseline), search.configs[0].condition_frames)
    plain = [row for row in rows if row.kind == "baseline" and row.condition_frames == base_cf]
    fig = _figure(4.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colors = [f"C{i}" for i in range(10)]
    for ax, metric in zip(axes, metrics):
        for i, config in enumerate(search.configs):
            frames, means = _mean_curve(by_config.get(config.name, []), metric)
            if frames:
                ax.plot(frames, means, "-", color=colors[i % 10], linewidth=2.2 if config.is_baseline else 1.3,
                        label=config.name + (" *" if config.is_baseline else ""))
        for trivial, style, label in ((False, "--", "no fine-tune"), (True, ":", "last frame repeated")):
            frames, means = _mean_curve(plain, metric, trivial)
            if frames:
                ax.plot(frames, means, style, color="0.35" if not trivial else "black",
                        label=f"{label} (cf {base_cf})")
        if search.common_window is not None:
            ax.axvspan(search.common_window.first_frame - 0.5, search.common_window.last_frame + 0.5, color="0.9",
                       zorder=0, label="common window")
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set_xlabel("frame index")
        ax.set_ylabel(f"{METRIC_LABELS[metric]}{METRIC_UNITS[metric]} ({better} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"search {search.name}: mean per frame over the videos" + ("  (PARTIAL)" if search.partial else ""))
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

