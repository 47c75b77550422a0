"""Acceptance: the conclusions of a sweep of the demo model (the built-in tiny LTX-Video), through
the CLI: per-frame scores that reproduce each row's mean, the condition_frames search on a common
window of frames (checked frame by frame against per_frame.csv), and the confirmation search,
refused until every search is finished, then planned as one config, run and reported.

One sweep of three small searches on 3 of the demo's bundled videos serves every test here.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Project

FRAMES, VIDEOS = 49, 3
CF_VALUES = [11, 22, 28]
METRICS = ("psnr", "ssim")
_SWEEP: dict[str, Any] = {}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def ok(run: Any, what: str) -> Any:
    assert run.returncode == 0, f"{what} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return run


@pytest.fixture
def sweep(make_project: Callable[..., Project]) -> dict[str, Any]:
    if _SWEEP:
        return _SWEEP
    project = make_project(lr_values=[1e-6, 1e-5, 1e-4], per_category=1, folder="demo-sweep", **{
                               "runner": {"name": "ltx"}, "model": {"inference_steps": 4},
                               "metrics": list(METRICS), "data.source": "sample", "data.num_frames": FRAMES,
                               "data.height": 64, "data.width": 64, "data.num_videos": VIDEOS,
                               "baseline": {"lr": 1e-5, "condition_frames": 22, "finetune_steps": 4},
                               "tasks": {"heartbeat_interval_s": 5, "heartbeat_grace_s": 120}})
    project.write_search("condition_frames", "condition_frames", CF_VALUES)
    project.write_search("steps", "finetune_steps", [2, 4])
    ok(project.run("plan", "--search", "lr"), "plan lr")
    refused = project.run("plan", "--search", "confirm")  # the other searches are not even planned
    ok(project.run("plan", "--search", "all"), "plan all")
    ok(project.run("submit", "--local", "--workers", "2", timeout=1800), "submit")
    with sqlite3.connect(project.db) as conn:
        before = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    planned = ok(project.run("plan", "--search", "confirm"), "plan confirm")
    with sqlite3.connect(project.db) as conn:
        added = conn.execute("SELECT kind, COUNT(*) FROM tasks GROUP BY kind").fetchall()
    ok(project.run("submit", "--local", "--workers", "2", timeout=1800), "submit confirm")
    report = ok(project.run("report"), "report")
    out = project.root / "results"
    _SWEEP.update(project=project, out=out, refused=refused, planned=planned, before=before, added=added,
                  stdout=report.stdout, summary=json.loads((out / "summary.json").read_text()),
                  per_video=read_csv(out / "per_video.csv"), per_frame=read_csv(out / "per_frame.csv"),
                  html=(out / "report.html").read_text())
    return _SWEEP


def frames_of(sweep: dict[str, Any]) -> dict[tuple[str, str, str], dict[int, dict[str, float]]]:
    """(search, config, video) -> frame -> metric."""
    found: dict[tuple[str, str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for row in sweep["per_frame"]:
        found[(row["search"], row["config"], row["video"])][int(row["frame"])] = {
            m: float(row[m]) for m in METRICS}
    return found


@pytest.mark.slow
def test_per_frame_scores_reproduce_every_rows_mean(sweep: dict[str, Any]) -> None:
    frames = frames_of(sweep)
    checked = 0
    for row in sweep["per_video"]:
        if row["status"] != "done":
            continue
        per_frame = frames[(row["search"], row["config"], row["video"])]
        assert sorted(per_frame) == list(range(int(row["condition_frames"]), FRAMES))  # exactly the unseen frames
        for metric in METRICS:
            assert float(row[metric]) == pytest.approx(np.mean([per_frame[f][metric] for f in sorted(per_frame)]),
                                                       abs=1e-9)
            checked += 1
    assert checked == 2 * len([r for r in sweep["per_video"] if r["status"] == "done"]) > 0
    trivial = [r for r in sweep["per_frame"] if r["search"] == "baseline_inference"]
    assert trivial and all(r["trivial_psnr"] for r in trivial)


@pytest.mark.slow
def test_the_condition_frames_search_is_also_scored_on_the_same_frames_for_every_config(sweep: dict[str, Any]
                                                                                      ) -> None:
    search = sweep["summary"]["searches"]["condition_frames"]
    window = search["common_window"]
    assert (window["first_frame"], window["last_frame"]) == (max(CF_VALUES), FRAMES - 1)
    frames = frames_of(sweep)
    for name, config in search["configs"].items():
        for metric in METRICS:
            by_video = {video: np.mean([frames[("condition_frames", name, video)][f][metric]
                                        for f in range(max(CF_VALUES), FRAMES)])
                        for (s, c, video) in frames if s == "condition_frames" and c == name}
            assert window["metrics"][name][metric]["n"] == VIDEOS
            assert window["metrics"][name][metric]["mean"] == pytest.approx(np.mean(list(by_video.values())),
                                                                             abs=1e-12)
            assert config["condition_frames"] != max(CF_VALUES) or \
                config["metrics"][metric]["mean"] == pytest.approx(window["metrics"][name][metric]["mean"], abs=1e-12)
    assert set(window["best"]) == set(METRICS) and "on frames 28-48" in window["best"]["psnr"]["statement"]
    assert all(sweep["summary"]["searches"][s]["common_window"] is None for s in ("lr", "steps"))
    assert 'id="window-condition_frames"' in sweep["html"] and "condition_frames_frames.png" in sweep["html"]
    assert "on the same frames for every config (28-48" in sweep["stdout"]


@pytest.mark.slow
def test_the_confirmation_search_combines_the_best_values_after_the_searches_finish(sweep: dict[str, Any]) -> None:
    refused = sweep["refused"]
    assert refused.returncode == 2 and "not finished" in refused.stderr and "condition_frames (not planned)" in \
        refused.stderr, refused.stderr
    summary = sweep["summary"]
    chosen = {name: s["best"]["psnr"]["config"] for name, s in summary["searches"].items() if name != "confirm"}
    combo = "+".join(chosen[name] for name in ("condition_frames", "lr", "steps"))
    assert f"confirm: {' + '.join(chosen[n] for n in ('condition_frames', 'lr', 'steps'))}" in sweep["planned"].stdout
    confirm = summary["searches"]["confirm"]
    assert sorted(confirm["configs"]) == sorted(["baseline", combo])
    assert "added 3 rows" in sweep["planned"].stdout  # the combination on 3 videos; its baseline rows exist
    kinds = dict(sweep["added"])
    assert sum(kinds.values()) == sweep["before"] + 3
    confirmation = summary["confirmation"]
    assert confirmation["combination"] == combo and confirmation["chosen"] == chosen
    effect = confirmation["effects"]["psnr"]
    assert effect["combined"]["pairs"] == VIDEOS
    singles = {name: (0.0 if summary["searches"][name]["configs"][config]["is_baseline"] else
                      summary["searches"][name]["configs"][config]["vs_baseline"]["psnr"]["mean_diff"])
               for name, config in chosen.items()}
    assert effect["singles"] == pytest.approx(singles)
    assert effect["sum_of_singles"] == pytest.approx(sum(singles.values()))
    assert 'id="confirmation"' in sweep["html"] and "the single-value effects sum to" in sweep["html"]
    assert "confirmation: " in sweep["stdout"]
