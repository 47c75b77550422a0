"""Precision of the `ltx` runner on the shipped demo weights (given a tiny T5, so that a real
prompt reaches every layer: the all-zero prompt leaves the caption projection and the
cross-attention norms without gradient): with `dtype: bfloat16` the trainable weights are float32
master weights, so every one of them moves after three AdamW steps at lr 1e-6, while pure bf16
weights (`trainable_dtype: bfloat16`) leave some bit-for-bit unchanged. Full and LoRA both.
Gradient checkpointing changes memory, not results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hparray.demo.tiny_text import save_checkpoint_with_text
from hparray.runners import Clip, Hyperparams
from hparray.runners.ltx import DEMO_WEIGHTS_DIR, LTXRunner
from hparray.runners.ltx.model import build_tiny_pipeline
from hparray.videos import VideoRef

torch.set_num_threads(1)

REF = VideoRef("wave", "/videos/wave.npy", "pan", "a red ball rolls across the wooden floor")
HP = Hyperparams(lr=1e-6, condition_frames=9, finetune_steps=3)
SEED = 4


def frames() -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32] / 32
    return np.stack([np.stack([np.sin(6 * (x + 0.04 * t)) * 0.5 + 0.5, y, np.cos(4 * (y - 0.03 * t)) * 0.5 + 0.5],
                              -1) for t in range(17)]).astype(np.float32)


@pytest.fixture(scope="module")
def demo_with_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo-text") / "checkpoint"
    return save_checkpoint_with_text(folder, build_tiny_pipeline(DEMO_WEIGHTS_DIR))


def runner(checkpoint: Path, **model: object) -> LTXRunner:
    built = LTXRunner({"name": "ltx"}, {"path": str(checkpoint), "inference_steps": 2, **model}, "cpu")
    built.load()
    return built


def trainable_after_steps(r: LTXRunner) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable tensors before, after HP's steps): the adapter of a seed is the same every time."""
    transformer = r.pipe.transformer
    if r.finetune_mode == "lora":
        r._trainable(SEED)
    before = {name: p.detach().clone() for name, p in transformer.named_parameters()
              if r.finetune_mode == "full" or "lora_" in name}
    r._restore()
    video = frames()[: HP.condition_frames]
    losses, diverged = r._finetune(video, HP, SEED, r._prompt(REF))
    assert diverged is None and len(losses) == HP.finetune_steps
    after = {name: p.detach().clone() for name, p in transformer.named_parameters() if name in before}
    r._restore()
    return before, after


def unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in before if torch.equal(before[name], after[name])]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_bf16_compute_with_fp32_master_weights_moves_every_trainable_tensor(finetune: str,
                                                                           demo_with_text: Path) -> None:
    master = runner(demo_with_text, finetune=finetune, dtype="bfloat16")
    before, after = trainable_after_steps(master)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert len(before) > 20 and unchanged(before, after) == []
    pure = runner(demo_with_text, finetune=finetune, dtype="bfloat16", trainable_dtype="bfloat16")
    before, after = trainable_after_steps(pure)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    lost = unchanged(before, after)
    assert len(lost) >= 3, f"pure bf16 kept every update ({len(before)} tensors): the comparison shows nothing"


def test_the_precision_is_in_every_result_and_the_frozen_parts_stay_in_the_compute_dtype(
        demo_with_text: Path) -> None:
    r = runner(demo_with_text, finetune="lora", dtype="bfloat16")
    assert r.pipe.vae.dtype == torch.bfloat16 and r.pipe.transformer.dtype == torch.bfloat16
    out = r.finetune_and_generate(Clip.conditioned(REF, frames(), 9), HP, SEED)
    assert out.notes["precision"] == {"compute": "bfloat16", "trainable": "float32", "frozen": "bfloat16",
                                      "autocast": True, "loss_scaling": False}
    assert out.frames is not None and np.isfinite(out.frames).all()
    full = runner(demo_with_text, dtype="bfloat16")
    assert full.pipe.transformer.dtype == torch.float32 and full.pipe.vae.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in full._snapshot.values())  # fp32-trained weights: no bf16 copy


def test_gradient_checkpointing_gives_the_same_results(demo_with_text: Path) -> None:
    clip = Clip.conditioned(REF, frames(), 9)
    hp = Hyperparams(lr=1e-4, condition_frames=9, finetune_steps=3)
    plain = runner(demo_with_text).finetune_and_generate(clip, hp, SEED)
    checkpointed_runner = runner(demo_with_text, gradient_checkpointing=True)
    assert checkpointed_runner.pipe.transformer.is_gradient_checkpointing
    checkpointed = checkpointed_runner.finetune_and_generate(clip, hp, SEED)
    assert plain.notes["loss_last"] == checkpointed.notes["loss_last"]
    assert plain.frames is not None and checkpointed.frames is not None
    assert np.array_equal(plain.frames, checkpointed.frames)
