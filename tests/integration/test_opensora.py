"""Open-Sora v1.3's own code through the shipped resident server, on the CPU: tiny STDiT3, v1.3 VAE
and T5 built from Open-Sora's classes (tests/support/opensora/build_tiny.py), a 2-video lr sweep
through `hparray submit` to a report, and the conditioning plan against the VAE's own functions.

Runs where HPARRAY_OPENSORA_CHECKOUT names an Open-Sora checkout at tag v1.3 and
HPARRAY_OPENSORA_PYTHON the interpreter of an environment holding its requirements (docs/opensora.md
says how to make both); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from hparray.runners.resident import SERVERS_DIR
from tests.conftest import Project

SUPPORT = Path(__file__).resolve().parents[1] / "support" / "opensora"
CHECKOUT = os.environ.get("HPARRAY_OPENSORA_CHECKOUT", "")
PYTHON = os.environ.get("HPARRAY_OPENSORA_PYTHON", "")

pytestmark = pytest.mark.skipif(
    not (CHECKOUT and PYTHON and Path(CHECKOUT, "opensora").is_dir() and Path(PYTHON).is_file()),
    reason="Open-Sora v1.3 is not here: set HPARRAY_OPENSORA_CHECKOUT (a checkout at tag v1.3) and "
           "HPARRAY_OPENSORA_PYTHON (its environment's python) to run these tests")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("opensora-tiny")
    built = subprocess.run([PYTHON, str(SUPPORT / "build_tiny.py"), "--opensora", CHECKOUT, "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def test_the_conditioning_plan_matches_the_vae_functions(tiny: Path) -> None:
    done = subprocess.run([PYTHON, str(SUPPORT / "check_latents.py"), CHECKOUT, str(tiny / "vae"), str(SERVERS_DIR)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["cf"]: row for row in (json.loads(line[4:]) for line in done.stdout.splitlines()
                                       if line.startswith("ROW "))}
    assert sorted(rows) == [5, 11, 17, 22, 28]
    for row in rows.values():
        assert row["prefix4"]["latents"] == row["prefix4"]["encode"]
        assert row["opensora"]["latents"] == row["opensora"]["collect_references_batch"]
        assert row["generated_49"] == {"frames": 49, "get_latent_size": 15}
    assert [rows[cf]["prefix4"]["used"] for cf in (5, 11, 17, 22, 28)] == [5, 9, 17, 21, 25]
    assert [rows[cf]["prefix4"]["latents"] for cf in (5, 11, 17, 22, 28)] == [2, 3, 5, 7, 8]
    assert [rows[cf]["opensora"]["used"] for cf in (5, 11, 17, 22, 28)] == [1, 1, 17, 17, 17]
    # get_latent_size of the cf frames themselves: what a (cf - 1) // 4 + 1 reading gets wrong
    assert [rows[cf]["get_latent_size_of_cf"] for cf in (5, 11, 17, 22, 28)] == [0, 0, 5, 5, 5]


def test_a_two_video_lr_sweep_runs_through_the_resident_server_to_a_report(make_project, tiny: Path) -> None:
    command = [PYTHON, "{servers}/opensora_v1_3.py", "--opensora", CHECKOUT, "--model", str(tiny / "stdit3"),
               "--vae", str(tiny / "vae"), "--t5", str(tiny / "t5"), "--dtype", "fp32", "--device", "cpu",
               "--inference-steps", "2"]
    project: Project = make_project(lr_values=[1e-5, 1e-4], per_category=1, frames=33, **{
        "runner": {"name": "resident", "command": command, "timeout_s": 1200, "start_timeout_s": 600},
        "metrics": ["psnr", "ssim"], "data.num_frames": 33, "data.height": 32, "data.width": 32,
        "baseline": {"lr": 1e-4, "condition_frames": 17, "finetune_steps": 2},
        "tasks": {"max_attempts": 1, "heartbeat_interval_s": 5, "heartbeat_grace_s": 120}})
    planned = project.run("plan", "--search", "lr", timeout=600)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "opensora-v1.3-server-1" in planned.stdout  # the server's identity, from its hello
    ran = project.run("submit", "--local", "--workers", "1", timeout=3000)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    with sqlite3.connect(project.db) as conn:
        assert conn.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall() == [("done", 6)]
        rows = conn.execute("SELECT t.kind, t.video, r.psnr, r.details FROM results AS r "
                            "JOIN tasks AS t ON t.id = r.task_id ORDER BY t.video, t.kind").fetchall()
    details = [json.loads(row[3]) for row in rows]
    assert all(d["condition_frames_used"] == 17 and d["condition_latent_frames"] == 5 for d in details)
    assert all(d["restored_exact"] for d, row in zip(details, rows) if row[0] == "finetune")
    assert all(d["cpu_fallbacks"] and not d["accelerations"]["enable_flash_attn"] for d in details)
    by_video: dict[str, set[float]] = {}
    for _kind, video, psnr, _ in rows:
        by_video.setdefault(video, set()).add(round(psnr, 6))
    assert all(len(values) > 1 for values in by_video.values())  # fine-tuning changed the predictions
    report = project.run("report", "--out", str(project.root / "report"), timeout=600)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (project.root / "report" / "report.html").is_file()
    assert json.loads((project.root / "report" / "summary.json").read_text())["metrics"] == ["psnr", "ssim"]
