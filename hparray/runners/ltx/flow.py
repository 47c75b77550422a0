"""The flow-matching pieces shared by test-time fine-tuning and the demo model's training: how
conditioning frames map onto LTX conditions, token layout and coordinates exactly as the pipeline
computes them, and the rectified-flow loss its Euler sampler integrates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


_PROMPT_TOKENS = 1
"""Length of the all-zero prompt: attention over identical tokens is the same for any length."""


@dataclass(frozen=True)
class ConditioningPlan:
    """How c conditioning frames map onto LTX conditions.

    The VAE encodes videos of s*m+1 frames only, so the first `prefix` frames go in as one
    video condition and the `leftover` frames after it as single-image conditions at their
    own frame index; together they are exactly the first c frames.
    """

    prefix: int
    leftover: tuple[int, ...]


def conditioning_plan(condition_frames: int, temporal_ratio: int) -> ConditioningPlan:
    """Split the first `condition_frames` frames into a hard video prefix and single frames."""
    prefix = (condition_frames - 1) // temporal_ratio * temporal_ratio + 1
    return ConditioningPlan(prefix=prefix, leftover=tuple(range(prefix, condition_frames)))


def generated_frame_count(num_frames: int, temporal_ratio: int) -> int:
    """Smallest s*m+1 >= num_frames: the pipeline silently shortens any other count."""
    return math.ceil((num_frames - 1) / temporal_ratio) * temporal_ratio + 1


def empty_prompt(transformer: Any, device: str, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All-zero prompt embeddings with a full mask: the model runs with no text encoder."""
    import torch

    channels = transformer.config.caption_channels
    embeds = torch.zeros(batch, _PROMPT_TOKENS, channels, device=device, dtype=transformer.dtype)
    mask = torch.ones(batch, _PROMPT_TOKENS, device=device, dtype=torch.long)
    return embeds, mask


def sampler_sigmas(pipe: Any, steps: int) -> torch.Tensor:
    """The noise levels (> 0) the pipeline's sampler visits with `steps` steps."""
    from diffusers.pipelines.ltx.pipeline_ltx_condition import (
        linear_quadratic_schedule,
        retrieve_timesteps,
    )

    retrieve_timesteps(
        pipe.scheduler, steps, "cpu", np.asarray(linear_quadratic_schedule(steps)) * 1000
    )
    sigmas = pipe.scheduler.sigmas.float().cpu()
    return sigmas[sigmas > 0]


def encode_latents(pipe: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Normalised latents of (B, 3, T, H, W) pixels in [-1, 1], exactly as the pipeline encodes
    its conditions (a draw from the VAE posterior)."""
    from diffusers.pipelines.ltx.pipeline_ltx_condition import retrieve_latents

    vae = pipe.vae
    latents = retrieve_latents(vae.encode(pixels.to(vae.device, vae.dtype)), generator)
    return pipe._normalize_latents(latents, vae.latents_mean, vae.latents_std).float()


def token_coords(
    pipe: Any, batch: int, latent_frames: int, latent_h: int, latent_w: int, frame_index: int
) -> torch.Tensor:
    """Pixel-space (t, y, x) coordinates of latent tokens, as the pipeline computes them."""
    device = pipe.transformer.device
    ids = pipe._prepare_video_ids(
        batch,
        latent_frames,
        latent_h,
        latent_w,
        patch_size=pipe.transformer_spatial_patch_size,
        patch_size_t=pipe.transformer_temporal_patch_size,
        device=device,
    )
    return pipe._scale_video_ids(
        ids,
        scale_factor=pipe.vae_spatial_compression_ratio,
        scale_factor_t=pipe.vae_temporal_compression_ratio,
        frame_index=frame_index,
        device=device,
    )


def layout_tokens(
    pipe: Any,
    video: torch.Tensor,
    images: Sequence[tuple[int, torch.Tensor]],
    frame_rate: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Latents laid out as the pipeline lays out its conditions and the video it generates.

    `video` is (B, C, F, h, w) latents from frame 0; `images` are single-frame conditions
    (frame index, (B, C, 1, h, w) latents). Single-frame tokens come first, then the video,
    frame-major. Returns (tokens (B, S, C), coordinates (B, 3, S) already divided by the frame
    rate, number of single-frame tokens).
    """
    import torch

    batch, _, frames, latent_h, latent_w = video.shape
    p, pt = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
    tokens, coords = [], []
    for index, latents in images:
        tokens.append(pipe._pack_latents(latents, p, pt))
        coords.append(token_coords(pipe, batch, 1, latent_h, latent_w, index))
    tokens.append(pipe._pack_latents(video, p, pt))
    coords.append(token_coords(pipe, batch, frames, latent_h, latent_w, 0))
    video_coords = torch.cat(coords, dim=2).float()
    video_coords[:, 0] = video_coords[:, 0] / frame_rate
    image_tokens = sum(t.shape[1] for t in tokens[:-1])
    return torch.cat(tokens, dim=1), video_coords, image_tokens


def training_tokens(pipe: Any, frames: np.ndarray, condition_frames: int, generator: torch.Generator,
                    frame_rate: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Clean latent tokens of the conditioning frames, laid out as the pipeline lays them out.

    Returns (tokens (1, S, C), coordinates (1, 3, S) already divided by the frame rate,
    the number of single-frame tokens, the number of latent frames of the video prefix).
    """
    import torch

    _, height, width, _ = frames.shape
    plan = conditioning_plan(condition_frames, pipe.vae_temporal_compression_ratio)
    with torch.no_grad():
        images = [(i, encode_latents(pipe, pipe.video_processor.preprocess(frames[i], height, width).unsqueeze(2),
                                     generator)) for i in plan.leftover]
        pixels = pipe.video_processor.preprocess_video(frames[: plan.prefix], height, width)
        prefix = encode_latents(pipe, pixels, generator)
    tokens, coords, image_tokens = layout_tokens(pipe, prefix, images, frame_rate)
    return tokens, coords, image_tokens, prefix.shape[2]


def flow_matching_loss(
    transformer: Any,
    clean: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    is_clean: torch.Tensor,
    coords: torch.Tensor,
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The rectified-flow loss the pipeline's Euler sampler integrates, on the noisy tokens only.

    clean/noise (B, S, C), sigma (B,), is_clean (B, S): clean tokens stay as they are at
    timestep 0 (as the pipeline keeps its conditions); the others become
    x_t = (1 - sigma) x0 + sigma noise at timestep sigma*1000, and the target is noise - x0.
    `prompt` is (embeddings, mask) of the video's prompt; None means the all-zero prompt of a
    model without a text encoder.
    """
    import torch

    sigma = sigma.to(clean.device).view(-1, 1, 1)
    noisy = torch.where(is_clean[..., None], clean, (1 - sigma) * clean + sigma * noise)
    timestep = torch.where(is_clean, 0.0, sigma[..., 0] * 1000.0)
    embeds, mask = prompt if prompt is not None else empty_prompt(transformer, clean.device, clean.shape[0])
    pred = transformer(
        hidden_states=noisy.to(transformer.dtype),
        encoder_hidden_states=embeds,
        timestep=timestep,
        encoder_attention_mask=mask,
        video_coords=coords,
        return_dict=False,
    )[0].float()
    return ((pred - (noise - clean)) ** 2)[~is_clean].mean()

