"""The GPU memory estimate: its weight, gradient and AdamW parts are the bytes a real fine-tune
step holds (measured on the tiny model, full and LoRA); its figures for the published 2 B
architecture are those of the CPU measurements it was fitted on (docs/memory.md); a config that
does not fit the stated GPU is refused with what would shrink it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from hparray.demo.tiny_text import save_checkpoint_with_text
from hparray.gpu_memory import DoesNotFit, MemoryFit, refuse_if_too_large
from hparray.runners import Clip, Hyperparams
from hparray.runners.ltx import LTXRunner
from hparray.runners.ltx.memory import GIB, Checkpoint, estimate_for
from hparray.runners.ltx.precision import Precision
from hparray.videos import VideoRef

torch.set_num_threads(1)

REF = VideoRef("ball", "/videos/ball.npy", "pan", "a red ball rolls across the wooden floor")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint_with_text(tmp_path_factory.mktemp("ltx-memory") / "checkpoint")


def measured_step(runner: LTXRunner) -> dict[str, int]:
    """Bytes of the trainable weights' gradients and of AdamW's state at the optimizer step."""
    seen: dict[str, int] = {}

    def hook(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen["grads"] = sum(p.grad.nbytes for p in params if p.grad is not None)
        seen["adam"] = sum(t.nbytes for state in optimizer.state.values() for k, t in state.items()
                           if k in ("exp_avg", "exp_avg_sq"))
        seen["trainable"] = sum(p.nbytes for p in params)

    handle = register_optimizer_step_post_hook(hook)
    try:
        frames = np.random.default_rng(0).random((17, 32, 32, 3), dtype=np.float32)
        runner.finetune_and_generate(Clip.conditioned(REF, frames, 9), Hyperparams(1e-4, 9, 1), seed=0)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("model", [{"finetune": "full"}, {"finetune": "lora", "dtype": "bfloat16"}],
                         ids=["full-fp32", "lora-bf16"])
def test_the_weight_gradient_and_adam_parts_are_the_bytes_a_real_step_holds(checkpoint: Path,
                                                                          model: dict[str, str]) -> None:
    runner = LTXRunner({"name": "ltx"}, {"path": str(checkpoint), "inference_steps": 2, **model}, "cpu")
    runner.load()
    estimate = runner.memory_estimate(32, 32, 17, 9)
    assert estimate is not None
    parts = {name: gib * GIB for name, gib in estimate.parts}
    base = sum(p.nbytes for p in runner.pipe.transformer.parameters())
    step = measured_step(runner)
    assert parts["gradients"] == step["grads"] == step["trainable"]
    assert parts["AdamW moments"] == step["adam"] == 2 * step["trainable"]
    assert parts["transformer weights"] == base + (step["trainable"] if model["finetune"] == "lora" else 0)
    vae = runner.pipe.vae
    assert parts["VAE weights"] == sum(t.nbytes for t in [*vae.parameters(), *vae.buffers()])
    assert parts["text encoder, while encoding prompts"] > 0


def test_the_2b_figures_are_the_fitted_ones() -> None:
    """On the meta device (shapes only), LTX-Video 2 B at 352x640, 49 frames, 25 conditioning
    frames, as its checkpoints are stored (bf16): the figures docs/memory.md tabulates."""
    from hparray.runners.ltx.published import build

    transformer, vae, _ = build("meta")
    checkpoint = Checkpoint.of_modules(transformer, vae, stored="BF16")
    assert checkpoint.transformer.count == 1_923_385_472 and checkpoint.transformer.lora_parameters(8) == 7_340_032

    def peak(finetune: str, compute: str, checkpointing: bool) -> float:
        return estimate_for(checkpoint, Precision(compute, "float32", finetune), lora_rank=8,
                            gradient_checkpointing=checkpointing, height=352, width=640, num_frames=49,
                            condition_frames=25).finetune_gib

    assert peak("full", "float32", False) == pytest.approx(37.2, abs=0.1)
    assert peak("full", "bfloat16", True) == pytest.approx(34.8, abs=0.1)
    assert peak("lora", "float32", False) == pytest.approx(16.9, abs=0.1)
    assert peak("lora", "bfloat16", False) == pytest.approx(9.7, abs=0.1)
    assert peak("lora", "bfloat16", True) < peak("lora", "bfloat16", False) - 3


def test_a_row_that_does_not_fit_the_stated_gpu_is_refused_with_the_fixes(checkpoint: Path) -> None:
    runner = LTXRunner({"name": "ltx"}, {"path": str(checkpoint)}, "cpu")
    estimate = runner.memory_estimate(352, 640, 49, 25)
    assert estimate is not None
    small = MemoryFit(estimate, "finetune", 25, 0.5, "slurm.gpu_memory_gib")
    assert small.fits is False
    with pytest.raises(DoesNotFit) as refused:
        refuse_if_too_large(small)
    message = str(refused.value)
    assert "does NOT fit the 0.5 GiB GPU (slurm.gpu_memory_gib)" in message and "model.finetune: lora" in message
    refuse_if_too_large(MemoryFit(estimate, "finetune", 25, 80.0, "slurm.gpu_memory_gib"))
    unknown = MemoryFit(estimate, "finetune", 25, None, "")
    assert unknown.fits is None and "set slurm.gpu_memory_gib" in unknown.line()
    refuse_if_too_large(unknown)  # nothing says how large the GPU is: said, not refused
