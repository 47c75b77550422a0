"""Per-video test-time fine-tuning of LTX-Video (diffusers' `LTXConditionPipeline`), in process.

The model is loaded once per worker and serves many tasks: each task fine-tunes the
transformer on the video's conditioning frames, generates the continuation, then puts the
base weights back in memory, so tasks never see each other's fine-tuning and a fixed seed
gives bit-identical output whatever ran before. A checkpoint with a T5 text encoder conditions
on each video's prompt (`text`); trainable weights stay in float32 under autocast (`precision`);
`memory` estimates a row's GPU memory before anything is queued.
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
    flow_matching_loss,
    generated_frame_count,
    sampler_sigmas,
    training_tokens,
)
from hparray.runners.ltx.model import DEMO_WEIGHTS_DIR, MANIFEST, build_tiny_pipeline, builtin_model_id, load_pipeline
from hparray.runners.ltx.precision import DTYPES, Precision, compact_copy
from hparray.runners.ltx.text import MAX_PROMPT_TOKENS, PromptEncoder, has_text_encoder, prompt_for

if TYPE_CHECKING:
    from hparray.runners.protocol import MemoryEstimate
    from hparray.videos import VideoRef

_FINETUNE_SEED_OFFSET = 1
"""Keeps the fine-tuning noise stream distinct from the sampling noise of the same seed."""

_LORA_ADAPTER = "hparray"
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]



def _peak_rss_mb() -> float:
    """Process RSS high-water mark (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LTXRunner:
    """The `ltx` runner: LTX-Video, full or LoRA test-time fine-tuning, text-conditioned when the
    checkpoint has a text encoder."""

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
        self.prompt_template: str | None = model.get("prompt")
        self.gradient_checkpointing = bool(model.get("gradient_checkpointing", False))
        if self.finetune_mode not in ("full", "lora"):
            raise ConfigError(f"model.finetune is {self.finetune_mode!r}: use 'full' or 'lora'")
        trainable = str(model.get("trainable_dtype", "float32"))
        for key, name in (("model.dtype", self.dtype_name), ("model.trainable_dtype", trainable)):
            if name not in DTYPES:
                raise ConfigError(f"{key} is {name!r}: use one of {', '.join(DTYPES)}")
        self.precision = Precision(self.dtype_name, trainable, self.finetune_mode)
        self.text_conditioned = has_text_encoder(self.model_path)
        if self.lora_rank < 1 or self.inference_steps < 1 or self.frame_rate < 1:
            raise ConfigError("model.lora_rank, model.inference_steps and model.frame_rate must be positive")
        self.pipe: Any = None
        self.prompts: PromptEncoder | None = None
        self._placed = False
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
        of one's own is named by model.path, which every config hash holds already, plus how it
        is prompted when it has a text encoder (model.prompt is in the hash when set)."""
        if self.model_path is None:
            return builtin_model_id()
        return f"t5-prompts-{MAX_PROMPT_TOKENS}" if self.text_conditioned else None

    def prompting(self) -> str:
        """Which text conditioning applies, for the plan."""
        if not self.text_conditioned:
            return "no text encoder in the checkpoint: every row runs on an all-zero prompt embedding"
        fallback = f"model.prompt {self.prompt_template!r}" if self.prompt_template is not None else "''"
        return f"T5 prompts from the checkpoint: each video's caption, else {fallback}"

    def describe(self) -> str:
        if self.model_path is not None:
            return f"runner ltx, model.path {self.model_path}; {self.prompting()}"
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
            self._check_prompting()
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
        self._check_prompting()

    def _check_prompting(self) -> None:
        if self.prompt_template is not None and not self.text_conditioned:
            where = self.model_path or "the built-in model"
            raise RunnerSetupError(f"model.prompt is set but {where} has no text encoder (text_encoder/ and "
                                   "tokenizer/ in model_index.json): remove model.prompt, or use a checkpoint with one")

    def load(self) -> None:
        """Read the pipeline, then a no-op. A text-conditioned model waits on the CPU until its
        prompts are encoded (`prepare`), so the text encoder never shares the GPU with it."""
        if self.pipe is not None:
            return
        started = time.perf_counter()
        import torch

        # The pipeline passes its own timesteps without sigmas on every call; the scheduler's
        # warning about that is noise in every worker log.
        logging.getLogger("diffusers.schedulers.scheduling_flow_match_euler_discrete").setLevel(logging.ERROR)
        pipe = self._read_pipeline()
        pipe.vae.requires_grad_(False)
        pipe.transformer.requires_grad_(False)
        if self.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()  # same gradients, one block's activations
        self.pipe = pipe
        if self.text_conditioned:
            assert self.model_path is not None
            # bf16 on a GPU, as LTX-Video's pipelines run T5 (half of T5-XXL's 18 GiB); fp32 on a CPU
            self.prompts = PromptEncoder(self.model_path, torch.bfloat16 if self.device.startswith("cuda")
                                         else torch.float32)
        self._unreported_load_s = time.perf_counter() - started
        if self.prompts is None or not self.device.startswith("cuda"):
            self._place()

    def _read_pipeline(self) -> Any:
        import torch

        compute, transformer_dtype = getattr(torch, self.precision.compute), getattr(torch, self.precision.transformer)
        try:
            if self.model_path is None:
                # A broken install must not quietly sweep a random model: refuse instead.
                if not (DEMO_WEIGHTS_DIR / MANIFEST).is_file():
                    raise RunnerError(f"the built-in model's weights are missing from {DEMO_WEIGHTS_DIR}: "
                                      "reinstall hparray, or retrain them with `python -m hparray.demo.train`")
                pipe = build_tiny_pipeline(DEMO_WEIGHTS_DIR)  # checked against its manifest
            elif not self.model_path.is_dir():
                # Checked here: diffusers would take a missing path for a Hub repo id.
                raise RunnerError(f"model.path {self.model_path} is not a directory: give a local LTX-Video "
                                  "checkpoint in diffusers layout, or null for the built-in tiny model")
            else:
                pipe = load_pipeline(self.model_path, {"transformer": transformer_dtype, "default": compute})
            # (diffusers warns on every cast, listing no module to keep in float32: noise here)
            casts = logging.getLogger("diffusers.models.modeling_utils")
            level = casts.level
            casts.setLevel(logging.ERROR)
            try:
                pipe.vae.to(dtype=compute)
                pipe.transformer.to(dtype=transformer_dtype)
            finally:
                casts.setLevel(level)
        except (OSError, ValueError, RuntimeError) as exc:
            where = self.model_path if self.model_path is not None else "the built-in tiny model"
            raise RunnerError(f"cannot load LTX-Video from {where}: {exc}") from exc
        return pipe

    def _place(self) -> None:
        """Move the pipeline to its device and snapshot the base weights there (once).

        LoRA never changes the base weights (the adapter is unloaded): only full fine-tuning needs
        a copy to restore, kept in bf16 where that is exact (a bf16 checkpoint's fp32 master weights).
        """
        if self._placed:
            return
        started = time.perf_counter()
        try:
            self.pipe.to(self.device)
        except RuntimeError as exc:  # out of memory, a broken device
            raise RunnerError(f"cannot move LTX-Video to {self.device}: {exc}") from exc
        self._snapshot = {} if self.finetune_mode == "lora" else {
            name: compact_copy(tensor) for name, tensor in self.pipe.transformer.state_dict().items()}
        self._placed = True
        self._unreported_load_s += time.perf_counter() - started

    def prepare(self, videos: list[VideoRef]) -> None:
        """Encode the prompts of the sweep's videos (and the empty prompt, guidance's negative) in
        one visit of the text encoder to the GPU, before the model goes there."""
        self.load()
        if self.prompts is not None:
            wanted = {prompt_for(ref, self.prompt_template) for ref in videos}
            self.prompts.encode(wanted | ({""} if self.guidance_scale > 1.0 else set()), self.device)
        self._place()

    def memory_estimate(self, height: int, width: int, num_frames: int, condition_frames: int
                        ) -> MemoryEstimate | None:
        """The GPU memory of a row (docs/memory.md), from the checkpoint's headers; no torch needed.
        None for the built-in model, which runs on the CPU."""
        from hparray.runners.ltx.memory import estimate

        if self.model_path is None:
            return None
        return estimate(self.model_path, self.precision, lora_rank=self.lora_rank,
                        gradient_checkpointing=self.gradient_checkpointing, text_encoder=self.text_conditioned,
                        height=height, width=width, num_frames=num_frames, condition_frames=condition_frames)

    # ------------------------------------------------------------------- tasks

    def baseline(self, clip: Clip, condition_frames: int, seed: int) -> Generation:
        """Generate the continuation with the un-fine-tuned weights."""
        timings = self._begin_task()
        frames = self._check_clip(clip, condition_frames)
        timings["finetune"] = 0.0
        return self._generate_task(frames, clip, seed, timings, self._notes(clip))

    def finetune_and_generate(self, clip: Clip, hp: Hyperparams, seed: int) -> Generation:
        """Fine-tune on the first `hp.condition_frames` frames, generate, restore the weights."""
        timings = self._begin_task()
        frames = self._check_clip(clip, hp.condition_frames)
        try:
            started = time.perf_counter()
            losses, diverged_at = self._finetune(frames, hp, seed, self._prompt(clip.ref))
            timings["finetune"] = self._elapsed(started)
            notes = self._notes(clip)
            if losses:
                notes.update(loss_first=losses[0], loss_last=losses[-1])
            if diverged_at is not None:
                timings["inference"] = 0.0
                notes["diverged_at_step"] = diverged_at
                return Generation(frames=None, timings_s=timings, peak_memory_mb=self._peak_memory_mb(),
                                  diverged=True, notes=notes)
            return self._generate_task(frames, clip, seed, timings, notes)
        finally:
            self._restore()

    # ---------------------------------------------------------------- internals

    def _begin_task(self) -> dict[str, float]:
        import torch

        self.load()
        self._place()
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

    def _notes(self, clip: Clip) -> dict[str, Any]:
        """What each result's details record of how the row ran: precision and prompt."""
        notes: dict[str, Any] = {"precision": self.precision.describe()}
        notes["prompt"] = prompt_for(clip.ref, self.prompt_template) if self.prompts is not None else None
        return notes

    def _prompt(self, ref: VideoRef | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, mask) of the video's prompt (None: the empty prompt) in the transformer's
        dtype, which the pipeline casts its latents to; all zeros without a text encoder."""
        transformer = self.pipe.transformer
        if self.prompts is None:
            return empty_prompt(transformer, self.device)
        text = prompt_for(ref, self.prompt_template) if ref is not None else ""
        # A video planned after `prepare` is encoded on the CPU: the GPU holds the model by then.
        return self.prompts.embeddings(text, self.device, transformer.dtype, encode_on="cpu")

    def _generate_task(self, frames: np.ndarray, clip: Clip, seed: int, timings: dict[str, float],
                       notes: dict[str, Any]) -> Generation:
        started = time.perf_counter()
        with self.precision.autocast(self.device):
            video = self._generate(frames, clip.num_frames, seed, clip.ref)
        timings["inference"] = self._elapsed(started)
        if not np.all(np.isfinite(video)):
            notes["diverged_in"] = "inference"
            return Generation(frames=None, timings_s=timings, peak_memory_mb=self._peak_memory_mb(), diverged=True,
                              notes=notes)
        return Generation(frames=video, timings_s=timings, peak_memory_mb=self._peak_memory_mb(), notes=notes)

    def _generate(self, frames: np.ndarray, num_frames: int, seed: int, ref: VideoRef) -> np.ndarray:
        """The whole video of `num_frames` frames, conditioned on exactly the given frames."""
        import torch
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        condition_frames, height, width, _ = frames.shape
        ratio_t = self.pipe.vae_temporal_compression_ratio
        plan = conditioning_plan(condition_frames, ratio_t)
        conditions = [LTXVideoCondition(video=frames[: plan.prefix], frame_index=0)]
        conditions += [LTXVideoCondition(image=frames[i], frame_index=i) for i in plan.leftover]
        embeds, mask = self._prompt(ref)
        negative: dict[str, torch.Tensor] = {}
        if self.guidance_scale > 1.0:  # the pipeline's own negative: the empty prompt
            empty, empty_mask = self._prompt(None)
            negative = {"negative_prompt_embeds": empty, "negative_prompt_attention_mask": empty_mask}
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

    def _trainable(self, seed: int) -> list[torch.nn.Parameter]:
        """Parameters to optimise: the whole transformer, or a fresh seeded LoRA adapter."""
        import torch

        transformer = self.pipe.transformer
        if self.finetune_mode == "full":
            transformer.requires_grad_(True)
            return [param for param in transformer.parameters()]
        from peft import LoraConfig

        config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights=True,
                            target_modules=_LORA_TARGETS)
        # peft initialises lora_A from the global CPU RNG: seed it so LoRA runs repeat exactly.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            transformer.add_adapter(config, adapter_name=_LORA_ADAPTER)
        params = [param for name, param in transformer.named_parameters() if "lora_" in name]
        trainable = getattr(torch, self.precision.trainable)
        for param in params:
            param.data = param.data.to(trainable)  # the adapter's master weights (the base stays frozen)
            param.requires_grad_(True)
        return params

    def _finetune(
        self, frames: np.ndarray, hp: Hyperparams, seed: int, prompt: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[list[float], int | None]:
        """AdamW on the flow-matching loss the sampler integrates; returns (losses, diverged step).

        Each step keeps a random number of leading latent frames clean (`flow_matching_loss`)
        and noises the rest to one of the sampler's levels, so no step is spent on a noise
        level generation never visits. The transformer stays in eval mode (LTX has no dropout),
        so nothing draws from the global RNG and a task is a pure function of its weights,
        video, hyperparameters and seed. Gradients are dropped right after each step, so they never
        coexist with the next forward's activations, nor with generation.
        """
        import torch

        if hp.finetune_steps <= 0:
            return [], None
        generator = torch.Generator("cpu").manual_seed(seed + _FINETUNE_SEED_OFFSET)
        clean, coords, image_tokens, prefix_latent_frames = training_tokens(
            self.pipe, frames, hp.condition_frames, generator, self.frame_rate
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
        # fused: no per-step copy of the parameters (foreach, the CUDA default, makes one)
        optimizer = torch.optim.AdamW(params, lr=hp.lr, fused=self.device.startswith("cuda") or None)
        scaler = self.precision.grad_scaler(self.device)
        losses: list[float] = []
        for step in range(hp.finetune_steps):
            clean_frames = int(
                torch.randint(fewest_clean, most_clean + 1, (1,), generator=generator)
            )
            sigma = sigmas[int(torch.randint(0, len(sigmas), (1,), generator=generator))]
            noise = torch.randn(clean.shape, generator=generator).to(self.device)
            is_clean = torch.zeros(1, tokens, dtype=torch.bool, device=self.device)
            is_clean[:, image_tokens : image_tokens + clean_frames * per_frame] = True
            with self.precision.autocast(self.device):
                loss = flow_matching_loss(transformer, clean, noise, sigma[None], is_clean, coords, prompt)
            value = loss.detach().item()
            if not math.isfinite(value):
                return losses, step
            losses.append(value)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
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
        if self._snapshot:
            transformer.load_state_dict(self._snapshot)
