"""Acceptance: sequential stopping through the CLI. An lr search on 10 videos with the test runner
(it darkens its predictions by lr, which on these videos makes lr 1e-5 better than the baseline
lr 1e-6 on every video and lr 1e-4 worse), stopping on with looks from 5 videos: lr 1e-4 stops,
its pending rows are skipped and never run; the better config, the baseline and the un-fine-tuned
rows run to the end; status and report say so, with the GPU-hours saved. With stopping off,
`submit --dry-run` says what it would resume, `plan` resumes the skipped rows and `submit --local`
runs them to done."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Project

VIDEOS = 10
# K = 10 - 5 + 1 = 6 looks at alpha 0.2: boundary 0.033 > 2**-5, so 5 videos all worse stop a config.
STOPPING = {"enabled": True, "alpha": 0.2, "min_videos": 5, "metric": "psnr"}


def _ok(run: Any, what: str) -> Any:
    assert run.returncode == 0, f"{what} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return run


def _by_config(project: Project) -> dict[str, dict[str, Any]]:
    state = json.loads(_ok(project.run("status", "--json"), "status --json").stdout)
    return {c["name"]: c for configs in state["searches"].values() for c in configs}


def _marks(folder: Path, lr: str) -> int:
    return sum(1 for p in folder.iterdir() if p.name.startswith("finetune-") and p.name.split("-")[2] == lr)


def test_a_worse_config_stops_its_rows_are_skipped_and_resume_when_stopping_is_off(
        make_project: Callable[..., Project], tmp_path: Path) -> None:
    project = make_project(lr_values=[1e-6, 1e-5, 1e-4], per_category=VIDEOS // 2, stopping=STOPPING,
                           **{"data.num_videos": VIDEOS, "baseline.lr": 1e-6})
    marks = tmp_path / "marks"
    marks.mkdir()
    project.env["HPARRAY_TEST_MARK_DIR"] = str(marks)
    _ok(project.run("plan", "--search", "lr"), "plan")
    run = _ok(project.run("submit", "--local", "--workers", "1"), "submit --local")
    configs = _by_config(project)
    worse, base, better = configs["lr_1e-4"], configs["lr_1e-6"], configs["lr_1e-5"]
    assert worse["skipped"] >= 3 and worse["done"] + worse["skipped"] == VIDEOS, worse
    assert (worse["pending"], worse["running"]) == (0, 0)
    assert _marks(marks, "0.0001") == worse["done"]  # no skipped row ever ran
    for config in (base, better, configs["no_finetune_cf_4"]):
        assert (config["done"], config["skipped"]) == (VIDEOS, 0), config
    assert f"{worse['skipped']} skipped" in run.stdout

    table = _ok(project.run("status"), "status").stdout
    assert "skipped" in table and "stopped" in table and f"{worse['skipped']} skipped by sequential stopping" in table

    report = _ok(project.run("report"), "report").stdout
    assert "lr_1e-4 stopped after" in report and "GPU-hours saved" in report, report
    out = project.root / "results"
    summary = json.loads((out / "summary.json").read_text())
    stopping = summary["stopping"]
    assert stopping["skipped_rows"] == worse["skipped"] and stopping["gpu_hours_saved"] > 0
    [stopped] = stopping["configs"].values()
    assert (stopped["search"], stopped["baseline"], stopped["skipped"]) == ("lr", "lr_1e-6", worse["skipped"])
    assert stopped["p_value"] < stopped["boundary"] == 0.2 / 6
    assert summary["searches"]["lr"]["configs"]["lr_1e-4"]["status"] == "stopped"
    assert summary["searches"]["lr"]["configs"]["lr_1e-4"]["metrics"]["psnr"]["n"] == worse["done"]
    assert summary["rows"]["skipped"] == worse["skipped"] and not summary["partial"]
    progress = json.loads((out / "progress.json").read_text())
    assert progress["lr"]["lr_1e-4"] == {"status": "stopped", "videos_completed": worse["done"]}
    html = (out / "report.html").read_text()
    assert 'id="stopping"' in html and "GPU-hours saved" in html and '<span class="tag">stopped</span>' in html

    base_yaml = project.base()
    base_yaml["stopping"]["enabled"] = False
    project.write_base(base_yaml)
    dry = _ok(project.run("submit", "--local", "--dry-run"), "submit --dry-run")
    assert f"would resume {worse['skipped']} rows" in dry.stdout
    assert _by_config(project)["lr_1e-4"]["skipped"] == worse["skipped"]  # a dry run writes nothing
    plan = _ok(project.run("plan", "--search", "lr"), "plan (stopping off)")
    assert f"resumed {worse['skipped']} rows that sequential stopping had skipped" in plan.stdout
    assert _by_config(project)["lr_1e-4"]["pending"] == worse["skipped"]
    _ok(project.run("submit", "--local", "--workers", "1"), "submit --local (resumed)")
    assert (_by_config(project)["lr_1e-4"]["done"], _by_config(project)["lr_1e-4"]["skipped"]) == (VIDEOS, 0)
    _ok(project.run("report"), "report (resumed)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopping"] is None and summary["searches"]["lr"]["configs"]["lr_1e-4"]["status"] == "completed"
