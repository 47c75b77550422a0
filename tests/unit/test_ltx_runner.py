"""The tiny real LTX-Video model end to end on the CPU: conditioning, fine-tuning, restoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hparray.errors import ConfigError, RunnerError
from hparray.runners import Clip, Generation, Hyperparams, runner_class
from hparray.runners.ltx import DEMO_WEIGHTS_DIR, LTXRunner
from hparray.runners.ltx.flow import conditioning_plan, generated_frame_count
from hparray.runners.ltx.model import build_tiny_pipeline
from hparray.videos import VideoRef

torch.set_num_threads(1)

T, SIZE, SEED = 33, 64, 11
MODEL = {
    "path": None,
    "finetune": "full",
    "lora_rank": 4,
    "inference_steps": 4,
    "guidance_scale": 1.0,
    "dtype": "float32",
    "frame_rate": 25,
}


REF = VideoRef(name="wave", path="/videos/wave.npy", category="pan")


def conditioned(video: np.ndarray, condition_frames: int) -> Clip:
    """What a runner is given of `video`: its first `condition_frames` frames."""
    return Clip.conditioned(REF, video, condition_frames)


def make_clip(num_frames: int = T, size: int = SIZE) -> np.ndarray:
    """A moving colour wave: smooth, structured, and different in every frame."""
    y, x = np.mgrid[0:size, 0:size] / size
    frames = np.stack(
        [
            np.stack(
                [np.sin(6 * (x + 0.04 * t)) * 0.5 + 0.5, y, np.cos(4 * (y - 0.03 * t)) * 0.5 + 0.5],
                -1,
            )
            for t in range(num_frames)
        ]
    ).astype(np.float32)
    return frames


@pytest.fixture(scope="module")
def runner() -> LTXRunner:
    r = LTXRunner({"name": "ltx"}, MODEL, "cpu")
    r.load()
    return r


@pytest.fixture(scope="module")
def lora_runner() -> LTXRunner:
    r = LTXRunner({"name": "ltx"}, {**MODEL, "finetune": "lora"}, "cpu")
    r.load()
    return r


def test_registered_as_the_ltx_builtin() -> None:
    assert runner_class("ltx") is LTXRunner


def test_conditioning_plan_uses_exactly_the_conditioning_frames() -> None:
    assert [conditioning_plan(c, 8).prefix for c in (1, 5, 9, 11, 17, 22, 28)] == [
        1,
        1,
        9,
        9,
        17,
        17,
        25,
    ]
    assert conditioning_plan(22, 8).leftover == (17, 18, 19, 20, 21)
    assert [generated_frame_count(n, 8) for n in (33, 34, 49, 50)] == [33, 41, 49, 57]


def test_tiny_weights_are_the_same_every_time_and_leave_the_global_rng_alone(
    tmp_path: Path,
) -> None:
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = build_tiny_pipeline(None).transformer.state_dict()
    b = build_tiny_pipeline(None).transformer.state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    build_tiny_pipeline(None).save_pretrained(tmp_path)
    c = build_tiny_pipeline(tmp_path).transformer.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_baseline_gives_the_whole_video(runner: LTXRunner) -> None:
    fresh = LTXRunner({"name": "ltx"}, MODEL, "cpu")
    first = fresh.baseline(conditioned(make_clip(), 9), condition_frames=9, seed=SEED)
    second = fresh.baseline(conditioned(make_clip(), 9), condition_frames=9, seed=SEED)
    assert isinstance(first, Generation) and not first.diverged
    assert first.frames is not None
    assert first.frames.shape == (T, SIZE, SIZE, 3) and first.frames.dtype == np.float32
    assert first.frames.min() >= 0.0 and first.frames.max() <= 1.0
    assert first.timings_s["load"] > 0 and second.timings_s["load"] == 0.0
    assert first.timings_s["finetune"] == 0.0 and first.timings_s["inference"] > 0
    assert first.peak_memory_mb > 0
    np.testing.assert_array_equal(first.frames, second.frames)


def test_finetune_changes_the_output_and_restore_is_exact(runner: LTXRunner) -> None:
    clip = make_clip()
    before = runner.baseline(conditioned(clip, 9), 9, SEED).frames
    tuned = runner.finetune_and_generate(
        conditioned(clip, 9), Hyperparams(lr=1e-3, condition_frames=9, finetune_steps=8), SEED
    )
    after = runner.baseline(conditioned(clip, 9), 9, SEED).frames
    again = runner.finetune_and_generate(
        conditioned(clip, 9), Hyperparams(lr=1e-3, condition_frames=9, finetune_steps=8), SEED
    )
    assert tuned.frames is not None and not tuned.diverged
    assert tuned.timings_s["finetune"] > 0 and tuned.timings_s["inference"] > 0
    assert np.isfinite(tuned.notes["loss_first"]) and np.isfinite(tuned.notes["loss_last"])
    assert np.abs(tuned.frames - before).max() > 1e-3
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(again.frames, tuned.frames)


@pytest.mark.parametrize("condition_frames", [5, 22])
def test_output_depends_on_exactly_the_first_condition_frames(
    runner: LTXRunner, condition_frames: int
) -> None:
    """Changing frame c (unseen) changes nothing; changing frame c-1 (seen) changes the output."""
    clip = make_clip()
    hp = Hyperparams(lr=1e-3, condition_frames=condition_frames, finetune_steps=3)
    reference = runner.finetune_and_generate(conditioned(clip, hp.condition_frames), hp, SEED).frames
    assert reference is not None and reference.shape == (T, SIZE, SIZE, 3)

    unseen = clip.copy()
    unseen[condition_frames:] = 0.0
    out = runner.finetune_and_generate(conditioned(unseen, condition_frames), hp, SEED).frames
    np.testing.assert_array_equal(out, reference)

    seen = clip.copy()
    seen[condition_frames - 1] = 1.0 - seen[condition_frames - 1]
    assert (
        np.abs(
            runner.finetune_and_generate(conditioned(seen, condition_frames), hp, SEED).frames - reference
        ).max()
        > 1e-4
    )
    assert (
        np.abs(
            runner.baseline(conditioned(seen, condition_frames), condition_frames, SEED).frames
            - runner.baseline(conditioned(clip, condition_frames), condition_frames, SEED).frames
        ).max()
        > 1e-4
    )


def test_other_condition_frames_and_seeds_give_other_output(runner: LTXRunner) -> None:
    clip = make_clip()
    base = runner.baseline(conditioned(clip, 9), 9, SEED).frames
    assert np.abs(runner.baseline(conditioned(clip, 17), 17, SEED).frames - base).max() > 1e-3
    assert np.abs(runner.baseline(conditioned(clip, 9), 9, SEED + 1).frames - base).max() > 1e-3


def test_huge_lr_diverges_without_exception_and_restores(runner: LTXRunner) -> None:
    clip = make_clip()
    before = runner.baseline(conditioned(clip, 9), 9, SEED).frames
    result = runner.finetune_and_generate(
        conditioned(clip, 9), Hyperparams(lr=1e6, condition_frames=9, finetune_steps=20), SEED
    )
    assert result.diverged and result.frames is None
    assert isinstance(result.notes["diverged_at_step"], int)
    np.testing.assert_array_equal(runner.baseline(conditioned(clip, 9), 9, SEED).frames, before)


def test_lora_finetunes_and_restores_exactly(lora_runner: LTXRunner) -> None:
    clip = make_clip()
    keys = set(lora_runner.pipe.transformer.state_dict())
    before = lora_runner.baseline(conditioned(clip, 9), 9, SEED).frames
    hp = Hyperparams(lr=1e-2, condition_frames=9, finetune_steps=5)
    tuned = lora_runner.finetune_and_generate(conditioned(clip, hp.condition_frames), hp, SEED).frames
    assert set(lora_runner.pipe.transformer.state_dict()) == keys
    np.testing.assert_array_equal(lora_runner.baseline(conditioned(clip, 9), 9, SEED).frames, before)
    again = lora_runner.finetune_and_generate(conditioned(clip, hp.condition_frames), hp, SEED).frames
    np.testing.assert_array_equal(again, tuned)
    assert np.abs(tuned - before).max() > 1e-4


def test_bad_clips_and_settings_are_refused(runner: LTXRunner) -> None:
    with pytest.raises(RunnerError, match="multiples of 32"):
        runner.baseline(conditioned(make_clip(size=48), 9), 9, SEED)
    with pytest.raises(RunnerError, match="condition_frames=33"):
        runner.baseline(Clip(REF, make_clip(), T), T, SEED)
    with pytest.raises(ConfigError, match=r"model\.finetune"):
        LTXRunner({}, {**MODEL, "finetune": "adapter"}, "cpu")
    with pytest.raises(RunnerError, match=r"model\.path /nonexistent is not a directory"):
        LTXRunner({}, {**MODEL, "path": "/nonexistent"}, "cpu").load()


def test_a_saved_checkpoint_loads_through_model_path(tmp_path: Path) -> None:
    """`model.path` loads a diffusers folder (no manifest needed): the shipped weights saved
    again give exactly the default built-in model's output."""
    build_tiny_pipeline(DEMO_WEIGHTS_DIR).save_pretrained(tmp_path)
    from_path = LTXRunner({}, {**MODEL, "path": str(tmp_path)}, "cpu")
    built = LTXRunner({}, MODEL, "cpu")
    clip = make_clip()
    np.testing.assert_array_equal(
        from_path.baseline(conditioned(clip, 9), 9, SEED).frames, built.baseline(conditioned(clip, 9), 9, SEED).frames
    )
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(RunnerError, match=f"cannot load LTX-Video from {tmp_path}"):
        LTXRunner({}, {**MODEL, "path": str(tmp_path)}, "cpu").load()
