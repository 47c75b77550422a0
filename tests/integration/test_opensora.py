"""Open-Sora v1.3's own code through the shipped resident server, on the CPU: tiny STDiT3, v1.3 VAE
and T5 built from Open-Sora's classes (tests/support/opensora/build_tiny.py), a 2-video lr sweep
through `hparray submit` to a report, the conditioning plan against the VAE's own functions, and
each condition_frames whose last micro-frame is shorter than 17 (5, 11, 22, 28) fine-tuned,
generated and scored through hparray's resident runner.

Runs where HPARRAY_OPENSORA_CHECKOUT names an Open-Sora checkout at tag v1.3 and
HPARRAY_OPENSORA_PYTHON the interpreter of an environment holding its requirements (docs/opensora.md
says how to make both); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hparray.metrics import Scorer
from hparray.runners.protocol import Clip, Hyperparams
from hparray.runners.resident import SERVERS_DIR, ResidentRunner
from hparray.videos import VideoRef, read_video
from tests.conftest import Project, subprocess_env, write_videos

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
                           capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def server_command(tiny: Path) -> list[str]:
    """runner.command of the shipped server on the tiny checkpoints: fp32 on the CPU, 2 sampling steps."""
    return [PYTHON, "{servers}/opensora_v1_3.py", "--opensora", CHECKOUT, "--model", str(tiny / "stdit3"),
            "--vae", str(tiny / "vae"), "--t5", str(tiny / "t5"), "--dtype", "fp32", "--device", "cpu",
            "--inference-steps", "2"]


def test_the_conditioning_plan_matches_the_vae_functions(tiny: Path) -> None:
    done = subprocess.run([PYTHON, str(SUPPORT / "check_latents.py"), CHECKOUT, str(tiny / "vae"), str(SERVERS_DIR)],
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
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
    command = server_command(tiny)
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


# ---------------------------------------------------------------- the shorter last micro-frame, end to end

FRAMES, SIZE = 33, 32


@pytest.fixture(scope="module")
def server(tiny: Path) -> Iterator[ResidentRunner]:
    """One resident server for the condition_frames below, started as a worker starts it (with the
    worker's one thread, as subprocess_env gives it: on 2 busy cores more threads make a row ~10x slower)."""
    runner = ResidentRunner({"command": server_command(tiny), "timeout_s": 600, "start_timeout_s": 600},
                            {"frame_rate": 24}, "cpu")
    with pytest.MonkeyPatch.context() as env:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setenv(name, os.environ.get(name, "1"))
        runner.load()
    try:
        yield runner
    finally:
        runner.stop()


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[VideoRef, np.ndarray]:
    [path] = write_videos(tmp_path_factory.mktemp("opensora-video"), ("pan",), 1, frames=FRAMES, size=SIZE)
    return VideoRef("pan/pan0", str(path), "pan"), read_video(str(path), FRAMES, SIZE, SIZE)


# (given, frames used, latent frames): the prefix4 rows of docs/opensora.md whose last micro-frame is
# shorter than 17, i.e. where Open-Sora's own truncation (1 or 17 frames) would condition differently.
@pytest.mark.parametrize("cf, used, latents", [(5, 5, 2), (11, 9, 3), (22, 21, 7), (28, 25, 8)])
def test_a_shorter_last_micro_frame_fine_tunes_generates_and_scores(
        server: ResidentRunner, video: tuple[VideoRef, np.ndarray], cf: int, used: int, latents: int) -> None:
    ref, truth = video
    clip = Clip.conditioned(ref, truth, cf)
    assert clip.frames.shape == (cf, SIZE, SIZE, 3)
    tuned = server.finetune_and_generate(clip, Hyperparams(lr=1e-3, condition_frames=cf, finetune_steps=1), seed=7)
    base = server.baseline(clip, cf, seed=7)
    for generation in (tuned, base):
        assert not generation.diverged, generation.notes
        assert generation.frames is not None and generation.frames.shape == (FRAMES, SIZE, SIZE, 3)
        assert generation.frames.dtype == np.float32 and np.isfinite(generation.frames).all()
        notes = generation.notes
        assert (notes["condition_frames_used"], notes["condition_latent_frames"]) == (used, latents), notes
        assert notes["cond_encode"] == "prefix4" and notes["generated_frames"] == FRAMES
        assert notes["latent_size"][0] == 10  # 33 frames = 2 micro-frames of 17 sharing one: 2 x 5 latents
        # the whole video comes back, the conditioning frames as given (float32 of the same pixels)
        np.testing.assert_allclose(generation.frames[:cf], truth[:cf], atol=1e-6)
    assert len(tuned.notes["losses"]) == 1 and np.isfinite(tuned.notes["losses"]).all()
    assert tuned.notes["restored_exact"] and tuned.timings_s["finetune"] > 0
    assert "losses" not in base.notes and base.timings_s["finetune"] == 0
    assert tuned.frames is not None and base.frames is not None
    assert not np.array_equal(tuned.frames[cf:], base.frames[cf:])  # the fine-tune step changed the prediction
    scorer = Scorer(["psnr", "ssim"])
    for generation in (tuned, base):
        assert generation.frames is not None
        per_frame = scorer.score_frames(generation.frames, truth, cf)
        assert all(len(values) == FRAMES - cf for values in per_frame.values())
        assert all(np.isfinite(values).all() for values in per_frame.values())
