"""The planner: the full grid is 13 distinct fine-tune configs and 5 baseline inferences per video."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from hparray.config import load_sweep
from hparray.plan import build_plan, config_hash
from hparray.runners import Hyperparams
from hparray.videos import VideoRef

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VIDEOS = [VideoRef(name=f"v{i:02d}", path=f"/data/v{i:02d}.mp4", category="c") for i in range(20)]


def test_full_grid_shares_the_baseline_config_and_baseline_inference() -> None:
    plan = build_plan(load_sweep(REPO_CONFIGS), "all", VIDEOS)
    kinds = Counter(task.kind for task in plan.tasks)
    assert kinds == {"finetune": 13 * 20, "baseline": 5 * 20}
    assert len({(t.config_hash, t.video) for t in plan.tasks}) == len(plan.tasks)
    shared = [c for c in plan.configs if len(c.names) == 3]
    assert len(shared) == 1 and shared[0].names == {"lr": "lr_1e-5", "condition_frames": "cf_22",
                                                     "steps": "steps_20"}
    assert shared[0].baseline_in == {"lr", "condition_frames", "steps"}


def test_finetune_rows_depend_on_the_baseline_inference_with_their_condition_frames() -> None:
    plan = build_plan(load_sweep(REPO_CONFIGS), "all", VIDEOS)
    by_hash = {c.hash: c for c in plan.configs}
    for task in plan.tasks:
        if task.kind == "finetune":
            assert task.depends_on is not None
            base_hash, video = task.depends_on
            assert video == task.video
            assert by_hash[base_hash].kind == "baseline"
            assert by_hash[base_hash].hp.condition_frames == by_hash[task.config_hash].hp.condition_frames
        else:
            assert task.depends_on is None
    assert min(t.priority for t in plan.tasks if t.kind == "finetune") > max(
        t.priority for t in plan.tasks if t.kind == "baseline")


def test_single_search_plans_only_its_baseline_inference() -> None:
    plan = build_plan(load_sweep(REPO_CONFIGS), "lr", VIDEOS)
    assert Counter(t.kind for t in plan.tasks) == {"finetune": 100, "baseline": 20}
    assert [c.label for c in plan.configs if c.kind == "finetune"] == [
        "lr_1e-6", "lr_5e-6", "lr_1e-5", "lr_5e-5", "lr_1e-4"]


def test_hash_depends_on_what_decides_the_result(tmp_path: Path) -> None:
    settings = load_sweep(REPO_CONFIGS).settings
    hp = Hyperparams(lr=1e-5, condition_frames=22, finetune_steps=20)
    first = config_hash("finetune", hp, settings)[0]
    assert first == config_hash("finetune", Hyperparams(1e-5, 22, 20), settings)[0]
    assert first != config_hash("finetune", Hyperparams(2e-5, 22, 20), settings)[0]
    assert first != config_hash("baseline", hp, settings)[0]
    configs = tmp_path / "configs"
    shutil.copytree(REPO_CONFIGS, configs)
    (configs / "base.yaml").write_text((configs / "base.yaml").read_text().replace("inference_steps: 8",
                                                                                   "inference_steps: 30"))
    assert first != config_hash("finetune", hp, load_sweep(configs).settings)[0]
    # Slurm resources and timeouts do not change what a task computes.
    (configs / "base.yaml").write_text((configs / "base.yaml").read_text().replace("inference_steps: 30",
                                                                                   "inference_steps: 8")
                                       .replace("mem_gb: 64", "mem_gb: 128"))
    assert first == config_hash("finetune", hp, load_sweep(configs).settings)[0]


def test_videos_are_ordered_video_major_for_comparable_partial_results() -> None:
    plan = build_plan(load_sweep(REPO_CONFIGS), "lr", VIDEOS)
    finetunes = [t for t in plan.tasks if t.kind == "finetune"]
    assert [t.video for t in finetunes[:5]] == ["v00"] * 5


def test_hash_names_the_built_in_weights(tmp_path: Path, monkeypatch) -> None:
    """Retrained built-in weights are another experiment: their rows must not reuse old results.
    The runner names its model (`identity()`); plan.py knows nothing of the built-in model."""
    from hparray.runners.ltx import model as ltx_model
    from hparray.runners.protocol import build_runner, runner_identity

    settings = load_sweep(REPO_CONFIGS).settings
    hp = Hyperparams(lr=1e-5, condition_frames=22, finetune_steps=20)
    identity = runner_identity(build_runner(settings))
    assert identity == ltx_model.builtin_model_id() != "missing"
    shipped, params = config_hash("finetune", hp, settings, identity)
    assert params["model_identity"] == identity
    monkeypatch.setattr(ltx_model, "DEMO_WEIGHTS_DIR", tmp_path / "no-weights")
    ltx_model.builtin_model_id.cache_clear()
    try:
        missing = runner_identity(build_runner(settings))
        other, _ = config_hash("finetune", hp, settings, missing)
        assert missing == "missing" and other != shipped
    finally:
        monkeypatch.undo()
        ltx_model.builtin_model_id.cache_clear()
    # A checkpoint of one's own (model.path) is named by the path, not by the shipped weights.
    own = settings.model_copy(update={"model": settings.model.model_copy(update={"path": "/models/ltx"})})
    assert runner_identity(build_runner(own)) is None
    assert "model_identity" not in config_hash("finetune", hp, own, None)[1]
