"""Per-video test-time fine-tuning of LTX-Video (diffusers' `LTXConditionPipeline`), in process.

The model is loaded once per worker and serves many tasks: each task fine-tunes the
transformer on the video's conditioning frames, generates the continuation, then puts the
base weights back in memory, so tasks never see each other's fine-tuning and a fixed seed
gives bit-identical output whatever ran before.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hparray.errors import ConfigError, RunnerError, RunnerSetupError
from hparray.runners.protocol import Clip, Generation, Hyperparams

if TYPE_CHECKING:
    import torch

from hparray.runners.ltx.flow import (
    conditioning_plan,
    empty_prompt,
    encode_latents,
    flow_matching_loss,
    generated_frame_count,
    layout_tokens,
    sampler_sigmas,
)
from hparray.runners.ltx.model import DEMO_WEIGHTS_DIR, MANIFEST, build_tiny_pipeline, builtin_model_id, load_pipeline

_FINETUNE_SEED_OFFSET = 1
"""Keeps the fine-tuning noise stream distinct from the sampling noise of the same seed."""

_PROMPT_TOKENS = 1
"""Length of the all-zero prompt: attention over identical tokens is the same for any length."""

_LORA_ADAPTER = "hparray"
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

_DTYPES = ("float32", "bfloat16", "float16")


def _peak_rss_mb() -> float:
    """Process RSS high-water mark (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LTXRunner:
    """The `ltx` runner: LTX-Video with no text encoder, full or LoRA test-time fine-tuning."""

    def __init__(self, runner: dict[str, Any], model: dict[str, Any], device: str) -> None:
        path = model.get("path")
        self.model_path = Path(path) if path is not None else None
        # The tiny model (under a million parameters) gains nothing from a GPU, and on the CPU
        # its numbers are the same on every node.
        self.device = device if self.model_path is not None else "cpu"
        self.finetune_mode = str(model.get("finetune", "full"))
        self.lora_rank = int(model.get("lora_rank", 8))
        self.inference_steps = int(model.get("inference_steps", 8))
        self.guidance_scale = float(model.get("guidance_scale", 1.0))
        self.dtype_name = str(model.get("dtype", "float32"))
        self.frame_rate = int(model.get("frame_rate", 25))
        if self.finetune_mode not in ("full", "lora"):
            raise ConfigError(f"model.finetune is {self.finetune_mode!r}: use 'full' or 'lora'")
        if self.dtype_name not in _DTYPES:
            raise ConfigError(
                f"model.dtype is {self.dtype_name!r}: use one of {', '.join(_DTYPES)}"
            )
        if self.lora_rank < 1 or self.inference_steps < 1 or self.frame_rate < 1:
            raise ConfigError(
                "model.lora_rank, model.inference_steps and model.frame_rate must be positive"
            )
        self.pipe: Any = None
        self._snapshot: dict[str, torch.Tensor] = {}
        self._unreported_load_s = 0.0

    # ----------------------------------------------------------------- what it runs

    @classmethod
    def geometry_problem(cls, height: int, width: int) -> tuple[str, str, str] | None:
        """LTX-Video's pipeline takes frame sizes in multiples of 32 only."""
        for key, size in (("data.height", height), ("data.width", width)):
            if size % 32:
                return key, f"must be a positive multiple of 32, got {size}", \
                    f"LTX-Video needs {key.split('.')[1]}s that are multiples of 32"
        return None

    def identity(self) -> str | None:
        """The built-in weights' digest (retrained weights never reuse old results); a checkpoint
        of one's own is named by model.path, which every config hash holds already."""
        return builtin_model_id() if self.model_path is None else None

    def describe(self) -> str:
        if self.model_path is not None:
            return f"runner ltx, model.path {self.model_path}"
        ident = builtin_model_id()
        if ident == "missing":
            return "runner ltx, built-in tiny model: WEIGHTS MISSING (reinstall hparray; workers will refuse to start)"
        return f"runner ltx, built-in tiny model trained on procedural videos (weights {ident})"

    # ----------------------------------------------------------------- loading

    def check(self) -> None:
        """Refuse what `load` would refuse, without importing torch: the packages of the [ltx]
        extra, a checkpoint folder in diffusers layout, the built-in weights."""
        import importlib.util

        missing = [name for name in ("torch", "diffusers", "peft") if importlib.util.find_spec(name) is None]
        if missing:
            raise RunnerSetupError(
                f"runner ltx needs {', '.join(missing)}, not installed here: pip install 'hparray[ltx]', "
                "or choose another runner.name"
            )
        if self.model_path is None:
            if not (DEMO_WEIGHTS_DIR / MANIFEST).is_file():
                raise RunnerSetupError(
                    f"the built-in model's weights are missing from {DEMO_WEIGHTS_DIR}: reinstall hparray, "
                    "or set model.path to a local LTX-Video checkpoint"
                )
            return
        if not self.model_path.is_dir():
            raise RunnerSetupError(
                f"model.path {self.model_path} is not a folder: point it at a local LTX-Video checkpoint "
                "(diffusers layout), or set it to null for the built-in model"
            )
        if not (self.model_path / "model_index.json").is_file():
            raise RunnerSetupError(
                f"model.path {self.model_path} is not an LTX-Video checkpoint in diffusers layout "
                "(no model_index.json): point it at the folder holding model_index.json, transformer/ and vae/"
            )

    def load(self) -> None:
        """Build or read the pipeline and snapshot the transformer's weights; then a no-op."""
        if self.pipe is not None:
            return
        started = time.perf_counter()
        import torch

        # The pipeline passes its own timesteps without sigmas on every call; the scheduler's
        # warning about that is noise in every worker log.
        logging.getLogger("diffusers.schedulers.scheduling_flow_match_euler_discrete").setLevel(
            logging.ERROR
        )
        dtype = getattr(torch, self.dtype_name)
        try:
            if self.model_path is None:
                # A broken install must not quietly sweep a random model: refuse instead.
                if not (DEMO_WEIGHTS_DIR / MANIFEST).is_file():
                    raise RunnerError(
                        f"the built-in model's weights are missing from {DEMO_WEIGHTS_DIR}: "
                        "reinstall hparray, or retrain them with "
                        "`python -m hparray.demo.train`"
                    )
                pipe = build_tiny_pipeline(DEMO_WEIGHTS_DIR)  # checked against its manifest
            elif not self.model_path.is_dir():
                # Checked here: diffusers would take a missing path for a Hub repo id.
                raise RunnerError(
                    f"model.path {self.model_path} is not a directory: give a local LTX-Video "
                    "checkpoint in diffusers layout, or null for the built-in tiny model"
                )
            else:
                pipe = load_pipeline(self.model_path, dtype)
            if pipe.transformer.dtype != dtype:
                pipe.to(dtype=dtype)
            pipe.to(self.device)
        except (OSError, ValueError, RuntimeError) as exc:
            where = self.model_path if self.model_path is not None else "the built-in tiny model"
            raise RunnerError(f"cannot load LTX-Video from {where}: {exc}") from exc
        pipe.vae.requires_grad_(False)
        pipe.transformer.requires_grad_(False)
        self.pipe = pipe
        self._snapshot = {
            name: tensor.detach().clone() for name, tensor in pipe.transformer.state_dict().items()
        }
        self._unreported_load_s = time.perf_counter() - started

    # ------------------------------------------------------------------- tasks

    def baseline(self, clip: Clip, condition_frames: int, seed: int) -> Generation:
        """Generate the continuation with the un-fine-tuned weights."""
        timings = self._begin_task()
        frames = self._check_clip(clip, condition_frames)
        timings["finetune"] = 0.0
        return self._generate_task(frames, clip.num_frames, seed, timings, {})

    def finetune_and_generate(self, clip: Clip, hp: Hyperparams, seed: int) -> Generation:
        """Fine-tune on the first `hp.condition_frames` frames, generate, restore the weights."""
        timings = self._begin_task()
        frames = self._check_clip(clip, hp.condition_frames)
        try:
            started = time.perf_counter()
            losses, diverged_at = self._finetune(frames, hp, seed)
            timings["finetune"] = self._elapsed(started)
            notes: dict[str, Any] = (
                {"loss_first": losses[0], "loss_last": losses[-1]} if losses else {}
            )
            if diverged_at is not None:
                timings["inference"] = 0.0
                notes["diverged_at_step"] = diverged_at
                return Generation(
                    frames=None,
                    timings_s=timings,
                    peak_memory_mb=self._peak_memory_mb(),
                    diverged=True,
                    notes=notes,
                )
            return self._generate_task(frames, clip.num_frames, seed, timings, notes)
        finally:
            self._restore()

    # ---------------------------------------------------------------- internals

    def _begin_task(self) -> dict[str, float]:
        import torch

        self.load()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        timings = {"load": self._unreported_load_s}
        self._unreported_load_s = 0.0
        return timings

    def _elapsed(self, started: float) -> float:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _peak_memory_mb(self) -> float:
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _peak_rss_mb()

    def _check_clip(self, clip: Clip, condition_frames: int) -> np.ndarray:
        frames = np.asarray(clip.frames, dtype=np.float32)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != condition_frames:
            raise RunnerError(
                f"video {clip.ref.name}: conditioning frames have shape {frames.shape}, "
                f"expected ({condition_frames}, H, W, 3)"
            )
        num_frames = clip.num_frames
        _, height, width, _ = frames.shape
        # The pipeline itself refuses sizes that are not multiples of 32.
        ratio = math.lcm(32, self.pipe.vae_spatial_compression_ratio)
        if height % ratio or width % ratio:
            raise RunnerError(
                f"video {clip.ref.name}: {height}x{width} frames, "
                f"LTX-Video needs multiples of {ratio}"
            )
        if not 1 <= condition_frames < num_frames:
            raise RunnerError(
                f"video {clip.ref.name}: condition_frames={condition_frames} "
                f"must be in 1..{num_frames - 1} "
                f"for a {num_frames}-frame clip"
            )
        return frames

    def _prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        return empty_prompt(self.pipe.transformer, self.device)

    def _generate_task(
        self,
        frames: np.ndarray,
        num_frames: int,
        seed: int,
        timings: dict[str, float],
        notes: dict[str, Any],
    ) -> Generation:
        started = time.perf_counter()
        video = self._generate(frames, num_frames, seed)
        timings["inference"] = self._elapsed(started)
        if not np.all(np.isfinite(video)):
            notes["diverged_in"] = "inference"
            return Generation(
                frames=None,
                timings_s=timings,
                peak_memory_mb=self._peak_memory_mb(),
                diverged=True,
                notes=notes,
            )
        return Generation(
            frames=video, timings_s=timings, peak_memory_mb=self._peak_memory_mb(), notes=notes
        )

    def _generate(self, frames: np.ndarray, num_frames: int, seed: int) -> np.ndarray:
        """The whole video of `num_frames` frames, conditioned on exactly the given frames."""
        import torch
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        condition_frames, height, width, _ = frames.shape
        ratio_t = self.pipe.vae_temporal_compression_ratio
        plan = conditioning_plan(condition_frames, ratio_t)
        conditions = [LTXVideoCondition(video=frames[: plan.prefix], frame_index=0)]
        conditions += [LTXVideoCondition(image=frames[i], frame_index=i) for i in plan.leftover]
        embeds, mask = self._prompt()
        negative: dict[str, torch.Tensor] = {}
        if self.guidance_scale > 1.0:
            negative = {"negative_prompt_embeds": embeds, "negative_prompt_attention_mask": mask}
        out = self.pipe(
            conditions=conditions,
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            height=height,
            width=width,
            num_frames=generated_frame_count(num_frames, ratio_t),
            frame_rate=self.frame_rate,
            num_inference_steps=self.inference_steps,
            guidance_scale=self.guidance_scale,
            image_cond_noise_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            **negative,
        ).frames
        video = out[0, :num_frames].permute(0, 2, 3, 1).float().cpu().numpy()
        return np.ascontiguousarray(video, dtype=np.float32)

    def _training_tokens(
        self, frames: np.ndarray, condition_frames: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Clean latent tokens of the conditioning frames, laid out as the pipeline lays them out.

        Returns (tokens (1, S, C), coordinates (1, 3, S) already divided by the frame rate,
        the number of single-frame tokens, the number of latent frames of the video prefix).
        """
        import torch

        pipe = self.pipe
        _, height, width, _ = frames.shape
        plan = conditioning_plan(condition_frames, pipe.vae_temporal_compression_ratio)
        with torch.no_grad():
            images = [
                (
                    i,
                    encode_latents(
                        pipe,
                        pipe.video_processor.preprocess(frames[i], height, width).unsqueeze(2),
                        generator,
                    ),
                )
                for i in plan.leftover
            ]
            pixels = pipe.video_processor.preprocess_video(frames[: plan.prefix], height, width)
            prefix = encode_latents(pipe, pixels, generator)
        tokens, coords, image_tokens = layout_tokens(pipe, prefix, images, self.frame_rate)
        return tokens, coords, image_tokens, prefix.shape[2]

    def _trainable(self, seed: int) -> list[torch.nn.Parameter]:
        """Parameters to optimise: the whole transformer, or a fresh seeded LoRA adapter."""
        import torch

        transformer = self.pipe.transformer
        if self.finetune_mode == "full":
            transformer.requires_grad_(True)
            return [param for param in transformer.parameters()]
        from peft import LoraConfig

        config = LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_rank,
            init_lora_weights=True,
            target_modules=_LORA_TARGETS,
        )
        # peft initialises lora_A from the global CPU RNG: seed it so LoRA runs repeat exactly.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            transformer.add_adapter(config, adapter_name=_LORA_ADAPTER)
        params = [param for name, param in transformer.named_parameters() if "lora_" in name]
        for param in params:
            param.requires_grad_(True)
        return params

    def _finetune(
        self, frames: np.ndarray, hp: Hyperparams, seed: int
    ) -> tuple[list[float], int | None]:
        """AdamW on the flow-matching loss the sampler integrates; returns (losses, diverged step).

        Each step keeps a random number of leading latent frames clean (`flow_matching_loss`)
        and noises the rest to one of the sampler's levels, so no step is spent on a noise
        level generation never visits. The transformer stays in eval mode (LTX has no dropout),
        so nothing draws from the global RNG and a task is a pure function of its weights,
        video, hyperparameters and seed.
        """
        import torch

        if hp.finetune_steps <= 0:
            return [], None
        generator = torch.Generator("cpu").manual_seed(seed + _FINETUNE_SEED_OFFSET)
        clean, coords, image_tokens, prefix_latent_frames = self._training_tokens(
            frames, hp.condition_frames, generator
        )
        tokens = clean.shape[1]
        per_frame = (tokens - image_tokens) // prefix_latent_frames
        # At least the first latent frame stays clean, as in generation; leftover single frames
        # lie after the prefix in time, so with them the whole prefix may be clean. A lone
        # latent frame (condition_frames == 1) can only be denoised from scratch.
        fewest_clean = 1 if image_tokens or prefix_latent_frames > 1 else 0
        most_clean = prefix_latent_frames if image_tokens else prefix_latent_frames - 1
        sigmas = sampler_sigmas(self.pipe, self.inference_steps)
        transformer = self.pipe.transformer
        params = self._trainable(seed)
        optimizer = torch.optim.AdamW(params, lr=hp.lr)
        losses: list[float] = []
        for step in range(hp.finetune_steps):
            clean_frames = int(
                torch.randint(fewest_clean, most_clean + 1, (1,), generator=generator)
            )
            sigma = sigmas[int(torch.randint(0, len(sigmas), (1,), generator=generator))]
            noise = torch.randn(clean.shape, generator=generator).to(self.device)
            is_clean = torch.zeros(1, tokens, dtype=torch.bool, device=self.device)
            is_clean[:, image_tokens : image_tokens + clean_frames * per_frame] = True
            loss = flow_matching_loss(transformer, clean, noise, sigma[None], is_clean, coords)
            value = loss.detach().item()
            if not math.isfinite(value):
                return losses, step
            losses.append(value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return losses, None

    def _restore(self) -> None:
        """Put the base weights back (~1 ms): the next task starts from the same model.

        A LoRA adapter is unloaded rather than only deleted: `delete_adapters` leaves empty peft
        wrappers whose state_dict keys (`...base_layer.weight`) no longer match the snapshot.
        """
        transformer = self.pipe.transformer
        if getattr(transformer, "peft_config", None):
            transformer.unload_lora()
        transformer.requires_grad_(False)
        transformer.zero_grad(set_to_none=True)  # a model's worth of memory otherwise
        transformer.load_state_dict(self._snapshot)
