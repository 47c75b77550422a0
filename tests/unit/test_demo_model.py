"""The shipped demo model: intact, refused when tampered with, better than random, reproducible."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hparray.demo.model import TrainConfig, compare, config_from_manifest, train, training_videos
from hparray.demo.sample_videos import CATEGORIES, VIDEOS_PER_CATEGORY, photo_for, sample_seed
from hparray.errors import RunnerError
from hparray.metrics import Scorer
from hparray.runners import Clip
from hparray.runners.ltx import DEMO_WEIGHTS_DIR, LTXRunner
from hparray.runners.ltx import runner as ltx
from hparray.runners.ltx.model import MANIFEST, build_tiny_pipeline, file_sha256, verify_manifest
from hparray.videos import list_videos, read_video

torch.set_num_threads(1)

MODEL = {"path": None, "finetune": "full", "inference_steps": 8, "frame_rate": 25}
HELD_OUT = ("pan", "rotate", "objects")  # one video each: camera motion, turning, moving patches
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


def test_shipped_weights_match_their_manifest_and_stay_small() -> None:
    manifest = verify_manifest(DEMO_WEIGHTS_DIR)
    files = manifest["files"]
    assert {TRANSFORMER, "vae/diffusion_pytorch_model.safetensors", "model_index.json"} <= set(
        files
    )
    for rel, sha in files.items():
        assert file_sha256(DEMO_WEIGHTS_DIR / rel) == sha
    total = sum(path.stat().st_size for path in DEMO_WEIGHTS_DIR.rglob("*") if path.is_file())
    assert total < 5 * 2**20
    assert {"torch", "diffusers"} <= set(manifest["versions"])
    assert manifest["command"] and manifest["training_time_s"]["wall_s"] > 0
    assert set(manifest["final_losses"]) >= {"vae_mse", "transformer_flow_matching"}
    # The defaults of the training command are the shipped settings: retyping it rebuilds them.
    assert config_from_manifest(DEMO_WEIGHTS_DIR / MANIFEST) == TrainConfig()
    assert manifest["seed"] == TrainConfig().seed


def test_training_videos_are_disjoint_from_the_sample_set() -> None:
    sample = {(c, sample_seed(c, i)) for c in CATEGORIES for i in range(VIDEOS_PER_CATEGORY)}
    sample_photos = {(c, photo_for(c, i)) for c in CATEGORIES for i in range(VIDEOS_PER_CATEGORY)}
    videos = training_videos(TrainConfig().videos)
    assert not {(v.category, v.seed) for v in videos} & sample
    assert min(v.seed for v in videos) > max(seed for _, seed in sample)
    assert not {(v.category, v.photo) for v in videos} & sample_photos


@pytest.mark.parametrize("tamper", ["changed", "missing", "unlisted", "bad manifest"])
def test_a_tampered_copy_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tamper: str
) -> None:
    copy = tmp_path / "demo-ltx"
    shutil.copytree(DEMO_WEIGHTS_DIR, copy)
    weights = copy / TRANSFORMER
    if tamper == "changed":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1  # one bit of one weight
        weights.write_bytes(bytes(data))
        message = f"{TRANSFORMER} has sha256"
    elif tamper == "missing":
        weights.unlink()
        message = f"{TRANSFORMER} is missing"
    elif tamper == "unlisted":
        (copy / "vae" / "extra.safetensors").write_bytes(b"")
        message = "vae/extra.safetensors is not in the manifest"
    else:
        (copy / MANIFEST).write_text("{", encoding="utf-8")
        message = "cannot read the sha256s"
    with pytest.raises(RunnerError, match=message):
        build_tiny_pipeline(copy)
    # The runner's default (model.path null) goes through the same check.
    monkeypatch.setattr(ltx, "DEMO_WEIGHTS_DIR", copy)
    with pytest.raises(RunnerError, match=f"model weights in {copy}"):
        LTXRunner({}, MODEL, "cpu").load()


def test_missing_weights_are_refused_not_replaced_by_a_random_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ltx, "DEMO_WEIGHTS_DIR", tmp_path / "demo-ltx")
    with pytest.raises(RunnerError, match="weights are missing from .*reinstall hparray"):
        LTXRunner({}, MODEL, "cpu").load()


def test_trained_model_predicts_held_out_videos_far_better_than_random_init(
    tmp_path: Path,
) -> None:
    """The bench asks >= 3 dB over the demo's 20 videos; 3 videos and 2 dB leave room for noise."""
    build_tiny_pipeline(None).save_pretrained(tmp_path)
    trained = LTXRunner({}, MODEL, "cpu")
    random_init = LTXRunner({}, {**MODEL, "path": str(tmp_path)}, "cpu")
    refs = list_videos("sample", config_dir=Path("."))
    picked = [next(r for r in refs if r.category == category) for category in HELD_OUT]
    scorer = Scorer(["psnr"])
    gains = []
    for ref in picked:
        frames = read_video(ref.path, 49, 64, 64)
        clip = Clip.conditioned(ref, frames, 22)
        ours = trained.baseline(clip, 22, 0).frames
        theirs = random_init.baseline(clip, 22, 0).frames
        assert ours is not None and theirs is not None
        gains.append(
            scorer.score(ours, frames, 22)["psnr"] - scorer.score(theirs, frames, 22)["psnr"]
        )
    assert np.mean(gains) >= 2.0, gains
    assert min(gains) > 0.0, gains


def test_training_is_bit_identical_run_to_run(tmp_path: Path) -> None:
    cfg = TrainConfig(
        videos=2, num_frames=17, vae_steps=2, vae_batch=2, vae_clip_frames=9,
        transformer_steps=3, transformer_batch=2, max_condition_frames=12,
        reparam_scale=0.25, reparam_steps=2,
    )
    lines: list[str] = []
    first = train(cfg, tmp_path / "a", command="test", out=lines.append)
    # A retrain from the manifest the first run wrote gives the same bytes.
    second = train(
        config_from_manifest(tmp_path / "a" / MANIFEST), tmp_path / "b", command="test",
        out=lines.append,
    )
    assert compare(first, second) == []
    assert first["files"] == json.loads((tmp_path / "b" / MANIFEST).read_text())["files"]
    for rel in first["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    # Training moved the weights away from their initialisation, and said so as it went.
    build_tiny_pipeline(None, seed=cfg.seed).save_pretrained(tmp_path / "init")
    assert first["files"][TRANSFORMER] != file_sha256(tmp_path / "init" / TRANSFORMER)
    assert any(line.startswith("[vae]") and "dB" in line for line in lines)
    assert any(line.startswith("[transformer]") and "loss" in line for line in lines)
    assert any(line.startswith("[reparametrised]") for line in lines)
    # A different seed gives different weights.
    other = train(replace(cfg, seed=1), tmp_path / "c", command="test", out=lines.append)
    assert TRANSFORMER in compare(first, other)
