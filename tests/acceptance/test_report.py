"""Acceptance: `hparray report` on a real sweep run through the CLI, checked against statistics
recomputed here, independently, from per_video.csv with numpy and scipy.

One sweep serves every report test (and tests/acceptance/test_report_html.py): plan an lr and a
steps search (steps exercises the cost plot and the all-differences-zero case), run part of it
with `hparray worker --max-tasks`, report, finish it with `hparray submit --local`, report again
into the same folder. Worker start-up (torch) dominates the cost, so the sweep is built once
per session.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from tests.conftest import Project

LR_VALUES = [1e-6, 1e-5, 1e-4]
STEPS_VALUES = [1, 2, 4]  # the test runner ignores steps: every difference is exactly zero
VIDEOS = 6
METRICS = ("psnr", "ssim")
# Baseline (un-fine-tuned) rows are claimed first, then fine-tune rows video by video: after
# every baseline row and 2 more, the first video is done for two lr configs and the third waits.
PARTIAL_TASKS = VIDEOS + 2
HIGHER_IS_BETTER = {"psnr": True, "ssim": True}


@dataclass
class ReportedSweep:
    """The project, what the partial report said (read before it was rewritten) and the final report."""

    project: Project
    out: Path
    partial_stdout: str
    partial_summary: dict[str, Any]
    partial_progress: dict[str, Any]
    partial_html: str
    partial_csv: list[dict[str, str]]
    partial_files: set[str]
    stdout: str

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())

    def csv_rows(self) -> list[dict[str, str]]:
        return read_csv(self.out / "per_video.csv")


_SWEEPS: dict[str, ReportedSweep] = {}


def _ok(run: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert run.returncode == 0, f"{what} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return run


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def reported_sweep(make_project: Callable[..., Project]) -> ReportedSweep:
    """Build (once per session) a sweep reported half-way and again when finished."""
    if "sweep" in _SWEEPS:
        return _SWEEPS["sweep"]
    project = make_project(lr_values=LR_VALUES, per_category=VIDEOS // 2, metrics=list(METRICS))
    project.write_search("steps", "finetune_steps", STEPS_VALUES)
    _ok(project.run("plan", "--search", "all"), "plan")
    _ok(project.run("worker", "--max-tasks", str(PARTIAL_TASKS)), "worker --max-tasks")
    partial = _ok(project.run("report"), "report (partial)")
    out = project.root / "results"
    partial_files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.parent.name in
                     ("results", "plots")}
    snapshot = dict(
        partial_stdout=partial.stdout,
        partial_summary=json.loads((out / "summary.json").read_text()),
        partial_progress=json.loads((out / "progress.json").read_text()),
        partial_html=(out / "report.html").read_text(),
        partial_csv=read_csv(out / "per_video.csv"),
        partial_files=partial_files,
    )
    _ok(project.run("submit", "--local", "--workers", "2"), "submit --local")
    final = _ok(project.run("report"), "report (final)")
    _SWEEPS["sweep"] = ReportedSweep(project=project, out=out, stdout=final.stdout, **snapshot)
    return _SWEEPS["sweep"]


@pytest.fixture
def sweep(make_project: Callable[..., Project]) -> ReportedSweep:
    return reported_sweep(make_project)


# ---------------------------------------------------------------- independent statistics


def scores(rows: list[dict[str, str]], search: str, config: str, metric: str, column: str | None = None
           ) -> dict[str, float]:
    """video -> value of the done rows of one config (column defaults to the metric)."""
    return {r["video"]: float(r[column or metric]) for r in rows
            if r["search"] == search and r["config"] == config and r["status"] == "done" and r[column or metric]}


def documented_bootstrap(values: np.ndarray, method: dict[str, Any]) -> tuple[float, float]:
    """The procedure summary.json states, written out again here."""
    rng = np.random.default_rng(method["seed"])
    means = values[rng.integers(0, len(values), size=(method["resamples"], len(values)))].mean(axis=1)
    tail = (1 - method["confidence"]) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def check_estimate(got: dict[str, Any], by_video: dict[str, float], method: dict[str, Any]) -> None:
    values = np.array([by_video[v] for v in sorted(by_video)])
    assert got["n"] == len(values)
    assert got["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
    assert got["std"] == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-12)
    low, high = documented_bootstrap(values, method)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((low, high), rel=1e-12, abs=1e-12)
    if values.std() == 0:
        return
    # scipy's own percentile bootstrap, with its own random stream: equal up to Monte Carlo error.
    ci = stats.bootstrap((values,), np.mean, n_resamples=method["resamples"], method="percentile",
                         confidence_level=method["confidence"], rng=np.random.default_rng(12345)).confidence_interval
    width = high - low
    assert abs(ci.low - got["ci_low"]) <= 0.05 * width + 1e-12
    assert abs(ci.high - got["ci_high"]) <= 0.05 * width + 1e-12
    assert got["ci_low"] <= got["mean"] <= got["ci_high"]


def check_comparison(got: dict[str, Any], own: dict[str, float], reference: dict[str, float], metric: str) -> None:
    videos = sorted(set(own) & set(reference))
    diffs = np.array([own[v] - reference[v] for v in videos])
    assert got["pairs"] == len(videos) == VIDEOS
    assert got["mean_diff"] == pytest.approx(diffs.mean(), abs=1e-12)
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    assert got["improved"] == int(np.sum(sign * diffs > 0))
    assert got["worse"] == int(np.sum(sign * diffs < 0))
    if not np.any(diffs):
        assert got["p_value"] == 1.0  # documented: nothing differs
    else:
        assert got["p_value"] == pytest.approx(stats.wilcoxon(diffs, alternative="two-sided").pvalue, abs=1e-12)


# ---------------------------------------------------------------- tests


def test_summary_matches_statistics_recomputed_from_per_video_csv(sweep: ReportedSweep) -> None:
    summary = sweep.summary()
    rows = sweep.csv_rows()
    method = summary["method"]["bootstrap"]
    assert summary["partial"] is False
    assert set(summary["metrics"]) == set(METRICS)
    assert list(rows[0])[:13] == ["search", "config", "parameter", "value", "video", "category", "kind", "status",
                                  "psnr", "ssim", "lpips", "finetune_s", "inference_s"]
    assert {r["search"] for r in rows} == {"lr", "steps", "baseline_inference"}
    assert len([r for r in rows if r["search"] == "baseline_inference"]) == VIDEOS
    assert all(r["status"] == "done" for r in rows)

    plain = {r["video"]: r for r in rows if r["search"] == "baseline_inference"}
    significant_somewhere = False
    for search, values in (("lr", LR_VALUES), ("steps", STEPS_VALUES)):
        report = summary["searches"][search]
        assert len(report["configs"]) == len(values)
        baseline = report["baseline_config"]
        for name, config in report["configs"].items():
            assert config["status"] == "completed" and config["rows"]["done"] == VIDEOS
            for metric in METRICS:
                own = scores(rows, search, name, metric)
                check_estimate(config["metrics"][metric], own, method)
                check_comparison(config["vs_baseline"][metric], own, scores(rows, search, baseline, metric), metric)
                no_finetune = {v: float(r[metric]) for v, r in plain.items()}
                trivial = {v: float(r[f"trivial_{metric}"]) for v, r in plain.items()}
                check_comparison(config["vs_no_finetune"][metric], own, no_finetune, metric)
                check_comparison(config["vs_trivial"][metric], own, trivial, metric)
                p = config["vs_baseline"][metric]["p_value"]
                significant_somewhere |= name != baseline and p < 0.05

        for metric in METRICS:
            sign = 1 if HIGHER_IS_BETTER[metric] else -1
            means = {name: c["metrics"][metric]["mean"] for name, c in report["configs"].items()}
            top = max(means.values(), key=lambda m: sign * m)
            best = report["best"][metric]
            assert means[best["config"]] == top
            # The verdict, recomputed: one-sided Wilcoxon (better than the baseline) for every other value,
            # Holm over them, the best mean's adjusted p against 0.05.
            others = [name for name in report["configs"] if name != baseline]
            reference = scores(rows, search, baseline, metric)
            one_sided = {}
            for name in others:
                own = scores(rows, search, name, metric)
                diffs = sign * np.array([own[v] - reference[v] for v in sorted(own)])
                one_sided[name] = 1.0 if not diffs.any() else stats.wilcoxon(diffs, alternative="greater").pvalue
            ordered = sorted(others, key=lambda name: one_sided[name])
            adjusted, running = {}, 0.0
            for rank, name in enumerate(ordered):
                running = max(running, min(1.0, (len(others) - rank) * one_sided[name]))
                adjusted[name] = running
            not_better = best["config"] == baseline or adjusted[best["config"]] >= 0.05
            assert ("not significantly better than the baseline" in best["statement"]) == not_better
            assert best["significant"] is not not_better and best["family"] == len(others)
            if best["config"] != baseline:
                assert best["p_value"] == pytest.approx(one_sided[best["config"]], abs=1e-12)
                assert best["p_holm"] == pytest.approx(adjusted[best["config"]], abs=1e-12)
                assert "unadjusted" in best["statement"] and f"Holm over {len(others)} configs" in best["statement"]
            assert best["config"] in sweep.stdout  # named in the terminal too

    assert significant_somewhere, "the test runner makes lr_1e-4 worse on every video: p = 1/32"
    steps = summary["searches"]["steps"]
    assert steps["best"]["psnr"]["config"] == steps["baseline_config"]  # all equal: the tie goes to the baseline
    gpu_s = sum(float(r["wall_s"]) for r in rows if r["search"] in ("lr", "baseline_inference")) + \
        sum(float(r["wall_s"]) for r in rows if r["search"] == "steps" and r["config"] != steps["baseline_config"])
    assert summary["gpu_hours"] == pytest.approx(gpu_s / 3600.0, rel=1e-9)
    for name in ("lr", "steps"):
        assert f"search {name}" in sweep.stdout


def test_progress_of_a_half_finished_sweep(sweep: ReportedSweep) -> None:
    progress = sweep.partial_progress
    plain = [r for r in sweep.partial_csv if r["search"] == "baseline_inference"]
    assert len(plain) == VIDEOS and all(r["status"] == "done" for r in plain)  # baseline rows go first
    assert progress["baseline_inference"] == {"no_finetune_cf_4": {
        "status": "completed", "lpips": None,
        **{m: pytest.approx(float(np.mean([float(r[m]) for r in plain])), rel=1e-12) for m in METRICS}}}
    lr = progress["lr"]
    in_progress = {name for name, entry in lr.items() if entry["status"] == "in_progress"}
    pending = {name for name, entry in lr.items() if entry["status"] == "pending"}
    assert len(in_progress) == 2 and len(pending) == 1, lr
    for name in in_progress:
        assert lr[name] == {"status": "in_progress", "videos_completed": 1}
    for name in pending:
        assert lr[name] == {"status": "pending"}
    assert {entry["status"] for entry in progress["steps"].values()} == {"in_progress", "pending"}

    # Video-major claim order: the configs that started did so on the same first video.
    done = [r for r in sweep.partial_csv if r["kind"] == "finetune" and r["status"] == "done"]
    assert {r["config"] for r in done if r["search"] == "lr"} == in_progress
    assert len({r["video"] for r in done}) == 1

    summary = sweep.partial_summary
    assert summary["partial"] is True and summary["searches"]["lr"]["partial"] is True
    assert summary["rows"]["done"] == PARTIAL_TASKS
    started = summary["searches"]["lr"]["configs"][sorted(in_progress)[0]]
    assert started["partial"] is True and started["metrics"]["psnr"]["n"] == 1
    assert started["metrics"]["psnr"]["ci_low"] == started["metrics"]["psnr"]["ci_high"]  # one video: no spread
    assert started["metrics"]["psnr"]["std"] is None
    assert started["vs_baseline"]["psnr"]["p_value"] is None  # documented: fewer than 2 pairs
    assert "PARTIAL" in sweep.partial_stdout
    assert 'id="partial-banner"' in sweep.partial_html and "partial" in sweep.partial_html


def test_report_again_rewrites_the_same_files(sweep: ReportedSweep) -> None:
    out = sweep.out
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.parent.name in ("results", "plots")}
    assert files == sweep.partial_files  # same names, new content
    assert {"summary.json", "progress.json", "per_video.csv", "report.html", "plots/lr_metrics.png",
            "plots/lr_deltas.png", "plots/steps_metrics.png", "plots/steps_deltas.png"} <= files
    assert not [name for name in files if name.endswith(".tmp") or "/." in f"/{name}"]
    assert not json.loads((out / "summary.json").read_text())["partial"]
    progress = json.loads((out / "progress.json").read_text())
    assert all(entry["status"] == "completed" for configs in progress.values() for entry in configs.values())
    assert 'id="partial-banner"' not in (out / "report.html").read_text()
    assert "PARTIAL" not in sweep.stdout
