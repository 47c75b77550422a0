"""Text conditioning of the `ltx` runner, on a checkpoint with a tiny T5 built here (no download):
captions matter, no caption is the empty string's encoding (not zeros), the text encoder does
not stay in memory after encoding, and the prompt is part of the config hash."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hparray.config import load_sweep
from hparray.demo.tiny_text import save_checkpoint_with_text
from hparray.errors import RunnerSetupError
from hparray.plan import config_hash
from hparray.runners import Clip, Hyperparams
from hparray.runners.ltx import LTXRunner
from hparray.runners.ltx.text import has_text_encoder, prompt_for
from hparray.runners.protocol import build_runner, runner_identity
from hparray.videos import VideoRef

torch.set_num_threads(1)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FRAMES, SIZE = 17, 32
BALL = VideoRef("ball", "/videos/ball.npy", "pan", "a red ball rolls across the wooden floor")
DOG = VideoRef("dog", "/videos/dog.npy", "zoom", "a dog runs on the beach at sunset")
SILENT = VideoRef("silent", "/videos/silent.npy", "rotate", None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint_with_text(tmp_path_factory.mktemp("ltx-text") / "checkpoint")


def text_runner(checkpoint: Path, **model: object) -> LTXRunner:
    runner = LTXRunner({"name": "ltx"}, {"path": str(checkpoint), "inference_steps": 2, **model}, "cpu")
    runner.load()
    return runner


def video() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.random((FRAMES, SIZE, SIZE, 3), dtype=np.float32)


def live_text_encoders() -> int:
    from transformers import T5EncoderModel

    gc.collect()
    return sum(type(obj) is T5EncoderModel for obj in gc.get_objects())


def test_a_checkpoint_with_text_is_recognised_and_the_plan_says_so(checkpoint: Path) -> None:
    assert has_text_encoder(checkpoint) and not has_text_encoder(None)
    runner = LTXRunner({"name": "ltx"}, {"path": str(checkpoint)}, "cpu")
    assert "T5 prompts from the checkpoint: each video's caption, else ''" in runner.describe()
    built_in = LTXRunner({"name": "ltx"}, {"path": None}, "cpu")
    assert not built_in.text_conditioned and "all-zero prompt embedding" in built_in.prompting()


def test_two_captions_give_different_embeddings_and_different_videos(checkpoint: Path) -> None:
    runner = text_runner(checkpoint)
    runner.prepare([BALL, DOG])
    ball, ball_mask = runner._prompt(BALL)
    dog, dog_mask = runner._prompt(DOG)
    assert ball.shape == dog.shape == (1, 256, runner.pipe.transformer.config.caption_channels)
    assert not torch.equal(ball, dog) and not torch.equal(ball_mask, dog_mask)
    frames = video()
    outputs = [runner.baseline(Clip.conditioned(ref, frames, 9), 9, seed=5) for ref in (BALL, DOG)]
    assert not np.array_equal(outputs[0].frames, outputs[1].frames)
    assert outputs[0].notes["prompt"] == BALL.caption


def test_no_caption_is_the_empty_string_encoding_which_is_not_zeros(checkpoint: Path) -> None:
    from diffusers import LTXConditionPipeline

    runner = text_runner(checkpoint)
    embeds, mask = runner._prompt(SILENT)
    pipe = LTXConditionPipeline.from_pretrained(str(checkpoint))  # diffusers' own encoding of ""
    with torch.no_grad():
        expected, expected_mask, _, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, device="cpu")
    assert torch.equal(embeds, expected) and torch.equal(mask.bool(), expected_mask)
    assert embeds.abs().max() > 0 and int(mask.sum()) == 1  # </s> alone, not the zero embedding
    templated = text_runner(checkpoint, prompt="a video of {category}")
    assert prompt_for(SILENT, templated.prompt_template) == "a video of rotate"
    assert not torch.equal(templated._prompt(SILENT)[0], embeds)
    assert prompt_for(BALL, templated.prompt_template) == BALL.caption  # a caption wins over the template


def test_the_text_encoder_is_loaded_once_and_not_kept_after_encoding(checkpoint: Path) -> None:
    runner = text_runner(checkpoint)
    assert runner.prompts is not None and live_text_encoders() == 0
    runner.prepare([BALL, DOG, SILENT])
    assert runner.prompts.loads == 1 and live_text_encoders() == 0
    frames = video()
    for ref in (BALL, DOG, SILENT):
        clip = Clip.conditioned(ref, frames, 9)
        runner.finetune_and_generate(clip, Hyperparams(lr=1e-4, condition_frames=9, finetune_steps=2), seed=1)
    assert runner.prompts.loads == 1 and live_text_encoders() == 0  # every row used the cache
    late = VideoRef("late", "/videos/late.npy", "pan", "waves crash against the rocks under a grey sky")
    runner.baseline(Clip.conditioned(late, frames, 9), 9, seed=1)  # a video planned later: encoded then
    assert runner.prompts.loads == 2 and live_text_encoders() == 0


def test_the_prompt_is_part_of_the_config_hash(checkpoint: Path, tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(REPO_CONFIGS, configs)
    base = yaml.safe_load((configs / "base.yaml").read_text())
    hp = Hyperparams(lr=1e-5, condition_frames=22, finetune_steps=20)

    def hashed(**model: object) -> str:
        (configs / "base.yaml").write_text(yaml.safe_dump({**base, "model": {**base["model"], **model}}))
        settings = load_sweep(configs).settings
        return config_hash("finetune", hp, settings, runner_identity(build_runner(settings)))[0]

    with_text = hashed(path=str(checkpoint))
    assert with_text != hashed(path=str(checkpoint), prompt="a video of {category}")
    assert hashed(path=str(checkpoint), prompt="a video of {category}") != hashed(path=str(checkpoint),
                                                                                  prompt="a clip of {category}")
    folder = tmp_path / "same-folder"
    shutil.copytree(checkpoint, folder)
    prompted = hashed(path=str(folder))
    shutil.rmtree(folder / "text_encoder")  # the same folder once its text encoder is gone: all-zero prompts
    assert hashed(path=str(folder)) != prompted
    assert runner_identity(LTXRunner({}, {"path": str(folder)}, "cpu")) is None
    assert runner_identity(LTXRunner({}, {"path": str(checkpoint)}, "cpu")) == "t5-prompts-256"


def test_a_prompt_template_without_a_text_encoder_is_refused() -> None:
    runner = LTXRunner({"name": "ltx"}, {"path": None, "prompt": "a video of {category}"}, "cpu")
    with pytest.raises(RunnerSetupError, match="model.prompt is set but the built-in model has no text encoder"):
        runner.check()
