"""What the sweep found: per-config estimates, paired tests against the baselines, plots, one HTML page.

Every config of a search scores the same videos, so comparisons are paired per video: the
per-video difference from a reference (the search's baseline config, the un-fine-tuned
inference with the same condition_frames, the last-conditioning-frame predictor) is what the
Wilcoxon signed-rank test and the improved-video counts use. Means come with a seeded
percentile bootstrap CI, so rerunning the report on the same rows gives the same numbers.

Computed here (records -> stats -> compute -> plots, strips, html), rendered by the CLI. Besides
summary.json and per_video.csv, per_frame.csv holds every scored frame of every row. The
report reads the rows through the store's `report_rows`, works on a sweep that is still running (partial results are
marked as such everywhere) and writes every file atomically, so a reader never sees half a file.

Conventions, stated once here and in the page:
- a metric's mean, std (ddof=1) and CI use the config's rows with status 'done'; diverged and
  failed rows are counted, never scored;
- bootstrap: a fresh `numpy.random.default_rng(BOOTSTRAP_SEED)` per estimate draws a
  (BOOTSTRAP_RESAMPLES, n) matrix of indices with `rng.integers(0, n, size=(B, n))` into the
  values in video-name order; the CI is `np.percentile` (linear) of the B resampled means at
  2.5 and 97.5; one value gives a zero-width CI, none gives no CI;
- Wilcoxon: `scipy.stats.wilcoxon(differences)`, zero differences dropped (scipy's 'wilcox'
  method); p is None for fewer than 2 pairs and 1.0 when every difference is zero (the baseline
  against itself). The tables show the two-sided p, unadjusted and Holm-adjusted over a search's
  configs; the verdict on a search's best value uses the one-sided p (better than the baseline)
  Holm-adjusted over the search's planned non-baseline configs (`stats.search_verdict`);
- "improved": the video's metric is better than the reference's (higher PSNR/SSIM, lower LPIPS).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from hparray.config import Settings
from hparray.errors import OutputError
from hparray.report.compute import Report, compute
from hparray.report.records import TaskRow
from hparray.store import Store

CSV_COLUMNS = ("search", "config", "parameter", "value", "video", "category", "kind", "status", "psnr", "ssim",
               "lpips", "finetune_s", "inference_s", "trivial_psnr", "trivial_ssim", "trivial_lpips", "wall_s",
               "condition_frames", "retried")


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
    files["per_frame"] = _write(out / "per_frame.csv", per_frame_csv(rows))
    from hparray.report.html import render_html
    from hparray.report.plots import make_plots
    from hparray.report.strips import frame_strips

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


FRAME_COLUMNS = ("search", "config", "video", "kind", "condition_frames", "frame", "psnr", "ssim", "lpips",
                 "trivial_psnr", "trivial_ssim", "trivial_lpips")


def per_frame_csv(rows: list[TaskRow]) -> str:
    """per_video.csv's rows frame by frame: each scored frame (from condition_frames on) of each
    row with per-frame scores, the trivial predictor's beside the un-fine-tuned rows'."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FRAME_COLUMNS)
    metrics = ("psnr", "ssim", "lpips")
    for row in rows:
        values = {m: row.frames(m) for m in metrics}
        trivial = {m: row.frames(m, trivial=True) for m in metrics}
        for frame in sorted(set().union(*values.values())):
            writer.writerow([row.search, row.config, row.video, row.kind, row.condition_frames, frame,
                             *(_cell(values[m].get(frame)) for m in metrics),
                             *(_cell(trivial[m].get(frame)) for m in metrics)])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: the CSV must reproduce summary.json exactly
    return str(value)

