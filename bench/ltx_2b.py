"""The published LTX-Video 2 B architecture through the `ltx` runner's own code, with random
weights (no download): shared by bench_ltx_2b.py (CPU) and gpu_check.py (one GPU).

`save_random_checkpoint` builds diffusers' 2 B transformer and the 0.9.5 VAE
(hparray.runners.ltx.published) in bf16, as LTX-Video's checkpoints are stored, with a tiny T5
of width 4096 (the transformer's caption_channels) as text encoder, and saves them in diffusers
layout. `run_config` then loads that folder with `LTXRunner`, encodes a caption, runs a fine-tune
row and a baseline row, and measures what each took: seconds, peak memory, and the bytes of the
trainable weights, their gradients and AdamW's state at the optimizer step, next to the
runner's own memory estimate.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

CAPTION = "a red ball rolls across the wooden floor"


def peak_rss_gib() -> float:
    """This process's RSS high-water mark (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def rss_gib() -> float:
    """This process's RSS now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def save_random_checkpoint(folder: Path) -> dict[str, float]:
    """The 2 B transformer, the 0.9.5 VAE and a tiny T5 (width 4096), random, bf16, saved; timings."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline

    from hparray.demo.tiny_text import build_text_encoder, build_tokenizer
    from hparray.runners.ltx.published import build

    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: half the memory, as the checkpoints are stored
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer, vae, _ = build("cpu")
    finally:
        torch.set_default_dtype(default)
    built = time.perf_counter()
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), transformer.config.caption_channels, layers=1)
    pipe = LTXConditionPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False), vae=vae,
                                text_encoder=text_encoder.to(torch.bfloat16), tokenizer=tokenizer,
                                transformer=transformer)
    pipe.save_pretrained(str(folder))
    del pipe, transformer, vae, text_encoder
    return {"build_s": built - started, "save_s": time.perf_counter() - built}


def frames(count: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    y, x = y / height, x / width
    return np.stack([np.stack([np.sin(6 * (x + 0.04 * t)) * 0.5 + 0.5, y, np.cos(4 * (y - 0.03 * t)) * 0.5 + 0.5],
                              -1) for t in range(count)]).astype(np.float32)


def run_config(folder: Path, device: str, model: dict[str, Any], *, height: int, width: int, num_frames: int,
               condition_frames: int, steps: int, warmup_steps: int = 0) -> dict[str, Any]:
    """Load `folder` with these model settings, fine-tune + generate one row, then one baseline row."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from hparray.runners import Clip, Hyperparams
    from hparray.runners.ltx import LTXRunner
    from hparray.videos import VideoRef

    on_gpu = device.startswith("cuda")
    result: dict[str, Any] = {"model": model, "device": device, "geometry": [num_frames, height, width],
                              "condition_frames": condition_frames, "steps": steps}
    runner = LTXRunner({"name": "ltx"}, {"path": str(folder), **model}, device)
    estimate = runner.memory_estimate(height, width, num_frames, condition_frames)
    assert estimate is not None
    result["estimate_gib"] = {**dict(estimate.parts), "finetune_peak": estimate.finetune_gib,
                              "inference_peak": estimate.inference_gib, "peak_with_context": estimate.peak_gib}
    if not on_gpu:
        reset_peak_rss()
    started = time.perf_counter()
    ref = VideoRef("ball", "/videos/ball.npy", "pan", CAPTION)
    runner.prepare([ref])  # load, encode the caption, move to the device
    result["load_s"] = time.perf_counter() - started
    result["rss_after_load_gib"] = rss_gib() if not on_gpu else None
    result["load_peak_gib"] = peak_rss_gib() if not on_gpu else torch.cuda.max_memory_allocated(device) / 2**30
    result["text_encoder_loads"] = runner.prompts.loads if runner.prompts else 0
    seen: dict[str, int] = {}

    def at_step(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.update(trainable=sum(p.nbytes for p in params),
                    grads=sum(p.grad.nbytes for p in params if p.grad is not None),
                    adam=sum(t.nbytes for s in optimizer.state.values() for k, t in s.items()
                             if k in ("exp_avg", "exp_avg_sq")))

    clip = Clip.conditioned(ref, frames(num_frames, height, width), condition_frames)
    if warmup_steps:  # kernels compiled and caches warm before the timed row
        runner.finetune_and_generate(clip, Hyperparams(1e-5, condition_frames, warmup_steps), seed=0)
    handle = register_optimizer_step_post_hook(at_step)
    try:
        if not on_gpu:
            reset_peak_rss()
        row = runner.finetune_and_generate(clip, Hyperparams(1e-5, condition_frames, steps), seed=0)
    finally:
        handle.remove()
    result["finetune"] = {"finetune_s": row.timings_s["finetune"], "s_per_step": row.timings_s["finetune"] / steps,
                          "inference_s": row.timings_s["inference"], "diverged": row.diverged,
                          "peak_gib": row.peak_memory_mb / 1024 if on_gpu else peak_rss_gib(),
                          "loss_first": row.notes.get("loss_first"), "precision": row.notes.get("precision")}
    transformer = runner.pipe.transformer
    result["measured_bytes_gib"] = {
        "transformer weights": (sum(p.nbytes for p in transformer.parameters()) + (seen.get("trainable", 0)
                                if runner.finetune_mode == "lora" else 0)) / 2**30,
        "gradients": seen.get("grads", 0) / 2**30, "AdamW moments": seen.get("adam", 0) / 2**30}
    if not on_gpu:
        reset_peak_rss()
    base = runner.baseline(clip, condition_frames, seed=0)
    result["baseline"] = {"inference_s": base.timings_s["inference"],
                          "peak_gib": base.peak_memory_mb / 1024 if on_gpu else peak_rss_gib()}
    result["finite"] = bool(row.frames is not None and np.isfinite(row.frames).all())
    del runner
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)
