"""Train the built-in demo model: a tiny LTX-Video that has learned the procedural videos.

A randomly initialised model scores every config the same (its VAE alone ruins every frame),
so `make demo` could not show what a sweep is for. This trains the runner's own architecture
(`hparray.runners.ltx.tiny_modules`) on procedural videos from the sample set's generator, on
seeds and photos the sample set does not use, so the sample set stays held out:

1. the VAE, on reconstruction of short random crops of the videos;
2. the transformer, on the flow-matching loss the runner fine-tunes with
   (`flow_matching_loss`), on the VAE's latents of whole videos, each batch conditioned on a
   random number of leading frames laid out exactly as the pipeline lays out its conditions
   (`layout_tokens`), so conditioned generation is what it learns;
3. a re-parametrisation that gives the tiny transformer a large model's sensitivity to the
   fine-tuning learning rate (`reparametrize` says why and how).

Every random draw comes from generators seeded by `TrainConfig.seed` in a fixed order, and
training runs on a fixed number of CPU threads, so the same settings, torch build and CPU give
bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hparray.demo.data import TRAIN_PHOTO_INDICES, TrainingVideo, render, training_videos
from hparray.demo.sample_videos import CATEGORIES
from hparray.runners.ltx.flow import (
    conditioning_plan,
    encode_latents,
    flow_matching_loss,
    layout_tokens,
    sampler_sigmas,
)
from hparray.runners.ltx.model import MANIFEST, build_tiny_pipeline, checkpoint_files, file_sha256

if TYPE_CHECKING:
    import torch


_VERSIONED = ("torch", "diffusers", "numpy", "scikit-image", "safetensors")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the weights; the manifest records it so they can be rebuilt."""

    seed: int = 0
    videos: int = 160
    num_frames: int = 49
    size: int = 64
    vae_steps: int = 800
    vae_batch: int = 8
    vae_clip_frames: int = 17
    vae_crop: int = 32
    vae_lr: float = 2e-3
    transformer_steps: int = 1200
    transformer_batch: int = 4
    transformer_lr: float = 1e-3
    reparam_scale: float = 1 / 256
    reparam_steps: int = 150
    max_condition_frames: int = 45
    inference_steps: int = 8
    frame_rate: int = 25
    threads: int = 1



class Progress:
    """Plain progress lines (a bar, the loss, elapsed and remaining time) that read well both
    in a terminal and in a log file."""

    def __init__(self, label: str, total: int, every: int, out: Callable[[str], None]) -> None:
        self.label, self.total, self.every, self.out = label, total, max(1, every), out
        self.started = time.perf_counter()

    def update(self, done: int, text: str) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (self.total - done) if done else 0.0
        filled = round(20 * done / self.total)
        bar = "#" * filled + "." * (20 - filled)
        self.out(
            f"[{self.label}] {done:>5}/{self.total} [{bar}] {text}  "
            f"{_clock(elapsed)} elapsed, ~{_clock(left)} left"
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


_LR_FLOOR = 0.1
"""The schedule ends at this fraction of its peak learning rate."""


def _schedule(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to `_LR_FLOOR` of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (_LR_FLOOR + (1.0 - _LR_FLOOR) / 2 * (1.0 + math.cos(math.pi * progress)))


def _to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) in [0, 1] -> (B, 3, T, H, W) in [-1, 1], the pipeline's VAE input."""
    import torch

    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3) * 2.0 - 1.0


_LOGVAR_FLOOR = -40.0
"""Below diffusers' clamp of the posterior log-variance (-30): std e^-15, and zero gradient."""


def pin_posterior(vae: Any) -> None:
    """Make the encoder's posterior deterministic: its log-variance channel is constant.

    A tiny VAE cannot afford noise in its latents: with the log-variance learned from its
    initial 0 (std 1), the first hundreds of steps only learn to shrink it. Pinned below the
    clamp, a posterior draw equals the mean to 1e-6 and the channel's gradient is exactly zero.
    """
    import torch

    conv = vae.encoder.conv_out.conv
    with torch.no_grad():
        conv.weight[-1].zero_()
        conv.bias[-1] = _LOGVAR_FLOOR


def train_vae(
    vae: Any, videos: np.ndarray, cfg: TrainConfig, out: Callable[[str], None]
) -> dict[str, float]:
    """Reconstruction (MSE in [-1, 1]) of random crops, through a posterior draw as the
    pipeline encodes (`pin_posterior` makes the draw the mean)."""
    import torch

    pin_posterior(vae)
    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + 1)
    rng = np.random.default_rng([cfg.seed, 1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    progress = Progress("vae", cfg.vae_steps, max(1, cfg.vae_steps // 40), out)
    ema = float("nan")
    crop, clip = min(cfg.vae_crop, cfg.size), min(cfg.vae_clip_frames, cfg.num_frames)
    for step in range(cfg.vae_steps):
        picks = []
        for _ in range(cfg.vae_batch):
            v = int(rng.integers(len(videos)))
            t0 = int(rng.integers(cfg.num_frames - clip + 1))
            y0, x0 = (int(a) for a in rng.integers(cfg.size - crop + 1, size=2))
            sample = videos[v, t0 : t0 + clip, y0 : y0 + crop, x0 : x0 + crop]
            picks.append(sample[:, :, ::-1] if rng.integers(2) else sample)
        pixels = _to_pixels(np.ascontiguousarray(np.stack(picks)))
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, cfg.vae_steps, cfg.vae_lr)
        latents = vae.encode(pixels).latent_dist.sample(gen)
        loss = torch.mean((vae.decode(latents).sample - pixels) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        ema = value if math.isnan(ema) else 0.95 * ema + 0.05 * value
        progress.update(step + 1, f"mse {ema:.5f} ({_psnr_db(ema):.2f} dB)")
    vae.eval()
    return {"vae_mse": ema, "vae_psnr_db": _psnr_db(ema)}


def _psnr_db(mse_in_minus1_1: float) -> float:
    """PSNR in [0, 1] pixel units of an MSE measured in [-1, 1] units."""
    return 10.0 * math.log10(4.0 / mse_in_minus1_1) if mse_in_minus1_1 > 0 else float("inf")


def encode_videos(
    pipe: Any, videos: np.ndarray, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents of every whole video (N, C, F, h, w) and of every frame on its own
    (N, T, C, 1, h, w), the way the pipeline encodes video and single-frame conditions.

    The per-channel mean and std of the video latents become the VAE's `latents_mean` and
    `latents_std`, so the transformer sees unit-scale latents.
    """
    import torch

    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + 2)
    vae = pipe.vae
    vae.latents_mean.zero_()
    vae.latents_std.fill_(1.0)
    raw_video, raw_single = [], []
    with torch.no_grad():
        for frames in videos:
            pixels = _to_pixels(frames[None])
            raw_video.append(encode_latents(pipe, pixels, gen))
            raw_single.append(encode_latents(pipe, pixels[0].permute(1, 0, 2, 3)[:, :, None], gen))
    video = torch.cat(raw_video)
    single = torch.stack(raw_single)
    channels = video.transpose(0, 1).reshape(video.shape[1], -1)
    vae.latents_mean.copy_(channels.mean(dim=1))
    vae.latents_std.copy_(channels.std(dim=1))
    mean, std = vae.latents_mean, vae.latents_std
    return (
        pipe._normalize_latents(video, mean, std),
        pipe._normalize_latents(single.flatten(0, 1), mean, std).unflatten(0, single.shape[:2]),
    )


def train_transformer(
    pipe: Any,
    video_latents: torch.Tensor,
    frame_latents: torch.Tensor,
    cfg: TrainConfig,
    out: Callable[[str], None],
) -> dict[str, float]:
    """The runner's flow-matching loss on whole videos, each batch conditioned on a random
    number of leading frames: a clean video prefix plus single-frame conditions, exactly the
    conditions the runner generates from."""
    import torch

    transformer = pipe.transformer
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.transformer_lr)
    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + 3)
    loss = _flow_matching_steps(
        pipe, video_latents, frame_latents, cfg, optimizer, gen,
        Progress("transformer", cfg.transformer_steps, cfg.transformer_steps // 40, out),
        peak_lr=cfg.transformer_lr, clip=True,
    )
    return {"transformer_flow_matching": loss}


def _flow_matching_steps(
    pipe: Any,
    video_latents: torch.Tensor,
    frame_latents: torch.Tensor,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    progress: Progress,
    peak_lr: float,
    clip: bool,
) -> float:
    """`progress.total` optimizer steps; returns the loss's moving average at the end. A param
    group's optional "lr_scale" multiplies the scheduled learning rate."""
    import torch

    transformer = pipe.transformer
    sampler = sampler_sigmas(pipe, cfg.inference_steps)
    ratio = pipe.vae_temporal_compression_ratio
    _, _, latent_frames, latent_h, latent_w = video_latents.shape
    per_frame = latent_h * latent_w
    max_condition = min(cfg.max_condition_frames, (latent_frames - 1) * ratio)
    transformer.train()
    ema = float("nan")
    for step in range(progress.total):
        condition = int(torch.randint(1, max_condition + 1, (1,), generator=gen))
        picks = torch.randint(0, len(video_latents), (cfg.transformer_batch,), generator=gen)
        plan = conditioning_plan(condition, ratio)
        video = video_latents[picks]
        images = [(i, frame_latents[picks, i]) for i in plan.leftover]
        clean, coords, image_tokens = layout_tokens(pipe, video, images, cfg.frame_rate)
        prefix_latent_frames = (plan.prefix - 1) // ratio + 1
        is_clean = torch.zeros(clean.shape[:2], dtype=torch.bool)
        is_clean[:, : image_tokens + prefix_latent_frames * per_frame] = True
        # Half the noise levels are the ones the default sampler visits, half anywhere in (0, 1].
        uniform = 1.0 - torch.rand(cfg.transformer_batch, generator=gen)
        visited = sampler[torch.randint(0, len(sampler), (cfg.transformer_batch,), generator=gen)]
        coin = torch.rand(cfg.transformer_batch, generator=gen) < 0.5
        sigma = torch.where(coin, visited, uniform)
        noise = torch.randn(clean.shape, generator=gen)
        lr = _schedule(step, progress.total, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        loss = flow_matching_loss(transformer, clean, noise, sigma, is_clean, coords)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        ema = value if math.isnan(ema) else 0.98 * ema + 0.02 * value
        progress.update(step + 1, f"loss {ema:.4f}")
    transformer.eval()
    return ema


def normalised_outputs(transformer: Any) -> list[Any]:
    """Linear layers whose outputs are normalised before anything reads them: the writers of
    the residual stream (every reader of the stream normalises it; the cross-attention to the
    one-token empty prompt adds a constant) and the self-attentions' query and key projections
    (RMS-normalised before the dot product)."""
    layers = [transformer.proj_in]
    for block in transformer.transformer_blocks:
        layers += [block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2]]
        layers += [block.attn1.to_q, block.attn1.to_k]
    return layers


def reparametrize(
    pipe: Any,
    video_latents: torch.Tensor,
    frame_latents: torch.Tensor,
    cfg: TrainConfig,
    out: Callable[[str], None],
) -> dict[str, float]:
    """Store the `normalised_outputs` layers `cfg.reparam_scale` times smaller, then train
    `cfg.reparam_steps` more steps in that parametrisation (at a `reparam_scale` times smaller
    learning rate for those layers).

    Why: Adam moves every weight by about the learning rate whatever its size, so fine-tuning
    a weight stored 256 times smaller is like fine-tuning the original at a 256 times larger
    learning rate. A 96-wide model shrugs off learning rates that damage a 2048-wide one (whose
    updates add up over 20 times more inputs), so without this the demo's learning rates would
    all score alike. As the next layer normalises these outputs, their scale does not change
    what the model computes, except through the normalisations' fixed epsilons
    (LayerNorm 1e-6, query/key RMSNorm 1e-5); the extra steps absorb that. The whole is the
    same as having trained those layers from a smaller initialisation at a smaller rate.
    """
    import torch

    transformer = pipe.transformer
    small = normalised_outputs(transformer)
    small_params = {id(p) for layer in small for p in (layer.weight, layer.bias)}
    with torch.no_grad():
        for layer in small:
            layer.weight.mul_(cfg.reparam_scale)
            layer.bias.mul_(cfg.reparam_scale)
    if cfg.reparam_steps <= 0:
        return {}
    peak = cfg.transformer_lr * _LR_FLOOR  # where the main schedule ended
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in transformer.parameters() if id(p) in small_params],
             "lr_scale": cfg.reparam_scale},
            {"params": [p for p in transformer.parameters() if id(p) not in small_params]},
        ],
        lr=peak,
    )
    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + 4)
    loss = _flow_matching_steps(
        pipe, video_latents, frame_latents, cfg, optimizer, gen,
        Progress("reparametrised", cfg.reparam_steps, cfg.reparam_steps // 10, out),
        peak_lr=peak, clip=False,
    )
    return {"reparametrised_flow_matching": loss}


def train(
    cfg: TrainConfig, out_dir: Path, command: str = "", out: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train, write the pipeline to `out_dir` (replaced whole) with its manifest, return it."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    # Only noise here: the scheduler's note on timesteps given without sigmas, and
    # save_pretrained's note that the pipeline has no text encoder to save.
    verbosity = diffusers_logging.get_verbosity()
    threads = torch.get_num_threads()
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out_dir, command, out)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig, out_dir: Path, command: str, out: Callable[[str], None]
) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    sources = training_videos(cfg.videos)
    out(
        f"rendering {len(sources)} training videos (seeds {sources[0].seed}.."
        f"{sources[-1].seed}, {cfg.num_frames} frames, {cfg.size}x{cfg.size})"
    )
    videos = np.stack([render(video, cfg.num_frames, cfg.size) for video in sources])
    timings["data_s"] = time.perf_counter() - started

    pipe = build_tiny_pipeline(None, seed=cfg.seed)
    mark = time.perf_counter()
    losses = train_vae(pipe.vae, videos, cfg, out)
    timings["vae_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    out("encoding the training videos with the trained VAE")
    video_latents, frame_latents = encode_videos(pipe, videos, cfg)
    del videos
    timings["encode_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    losses |= train_transformer(pipe, video_latents, frame_latents, cfg, out)
    if cfg.reparam_scale != 1.0:
        losses |= reparametrize(pipe, video_latents, frame_latents, cfg, out)
    timings["transformer_s"] = time.perf_counter() - mark
    timings["wall_s"] = time.perf_counter() - started
    timings["cpu_s"] = time.process_time() - cpu_started

    manifest = _write(pipe, out_dir, cfg, command, sources, timings, losses)
    out(
        f"wrote {out_dir} ({sum(f.stat().st_size for f in out_dir.rglob('*') if f.is_file()) / 2**20:.2f} MiB) "
        f"in {_clock(timings['wall_s'])}; final losses: "
        + ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    )
    return manifest


def _write(
    pipe: Any,
    out_dir: Path,
    cfg: TrainConfig,
    command: str,
    sources: list[TrainingVideo],
    timings: dict[str, float],
    losses: dict[str, float],
) -> dict[str, Any]:
    """Save in diffusers layout next to `out_dir`, add the manifest, then swap it into place,
    so an interrupted run never leaves half a model where the runner looks for one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        # mkdtemp and safetensors create owner-only files; installed weights must be readable.
        staging.chmod(0o755)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        manifest = {
            "model": "hparray built-in demo model: tiny LTX-Video (diffusers layout)",
            "command": command,
            "seed": cfg.seed,
            "settings": dataclasses.asdict(cfg),
            "steps": {"vae": cfg.vae_steps, "transformer": cfg.transformer_steps},
            "data": {
                "generator": "hparray.sample_videos.generate_video (rendered at 128 px, 57 frames)",
                "read_as": f"first {cfg.num_frames} frames, resized to {cfg.size}x{cfg.size}",
                "seeds": [sources[0].seed, sources[-1].seed],
                "categories": list(CATEGORIES),
                "photo_indices": list(TRAIN_PHOTO_INDICES),
                "held_out": "the sample set: seeds 0..27, photo indices 0..6 of each category",
            },
            "versions": {
                "python": platform.python_version(),
                **{name: metadata.version(name) for name in _VERSIONED},
            },
            "machine": {"cpu": platform.machine(), "threads": cfg.threads},
            "training_time_s": {k: round(v, 1) for k, v in timings.items()},
            "final_losses": {k: round(v, 6) for k, v in losses.items()},
            "files": {rel: file_sha256(staging / rel) for rel in checkpoint_files(staging)},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def config_from_manifest(path: Path) -> TrainConfig:
    """The settings a manifest was trained with, to rebuild (and compare) its weights."""
    settings = json.loads(path.read_text(encoding="utf-8"))["settings"]
    return TrainConfig(**settings)


def compare(manifest: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Files whose sha256 differs between two manifests (empty: bit-identical weights)."""
    ours, theirs = manifest["files"], reference["files"]
    return sorted(rel for rel in set(ours) | set(theirs) if ours.get(rel) != theirs.get(rel))


def default_command(argv: list[str]) -> str:
    """The command line as a user would retype it."""
    return shlex.join([Path(sys.executable).name, "-m", "hparray.demo.train", *argv])

