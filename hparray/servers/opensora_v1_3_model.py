"""The Open-Sora v1.3 side of `opensora_v1_3.py`: what conditions a row, the CPU fallbacks, and the
model (T5, the v1.3 VAE, STDiT3) with one method per task kind. Standard library at import; torch
and Open-Sora are imported when the model loads. Code references are at Open-Sora's tag v1.3.
"""

from __future__ import annotations

import json
import os
import sys
import time

import hparray_serve as hs


def log(*parts):
    print("[opensora-v1.3]", *parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ conditioning


def condition_plan(condition_frames, mode, micro_frame_size=17, temporal_overlap=True):
    """(pixel frames encoded, their latent frames) for `condition_frames` given frames.

    prefix4: the largest 4j+1 prefix; the v1.3 VAE encodes it in micro-frames [0:17], [16:33], ...
    (vae.py:92-104), a chunk of 4i+1 frames giving i+1 latents, so the latents cover exactly the
    frames used and line up with those of the generated video. opensora: collect_references_batch's
    truncation (inference_utils.py:182-190): 1 frame below 17, else the largest 16k+1.
    """
    if mode == "opensora":
        if micro_frame_size is None:
            used = (condition_frames - 1) // 4 * 4 + 1
        elif not temporal_overlap:
            used = max(condition_frames // micro_frame_size * micro_frame_size, 1)
        else:
            step = micro_frame_size - 1
            used = (condition_frames - 1) // step * step + 1
    else:
        used = (condition_frames - 1) // 4 * 4 + 1
    return used, latent_frames(used, micro_frame_size)


def latent_frames(frames, micro_frame_size=17):
    """Latent frames `vae.encode` gives for a 4j+1-frame clip (overlapping micro-frames of 17)."""
    if frames == 1:
        return 1
    step = micro_frame_size - 1
    total, start = 0, 0
    while start < frames - 1:
        chunk = min(frames, start + micro_frame_size) - start
        total += (chunk - 1) // 4 + 1
        start += step
    return total


def generated_frames(num_frames, micro_frame_size=17):
    """The smallest 16k+1 >= num_frames: what 5k latents decode to."""
    step = micro_frame_size - 1
    return max(((num_frames - 2) // step + 1) * step + 1, micro_frame_size) if num_frames > 1 else 1


# ------------------------------------------------------------------------------------ CPU fallbacks


def cpu_fallbacks():
    """Let STDiT3 run on CPU tensors; CUDA tensors keep Open-Sora's code paths. Returns what was installed."""
    import torch
    import torch.nn.functional as F
    import xformers.ops as xops
    from opensora.models.layers import blocks

    original = xops.memory_efficient_attention

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
        if query.device.type != "cpu":
            return original(query, key, value, attn_bias=attn_bias, p=p, scale=scale, **kwargs)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, M, H, K] -> [B, H, M, K]
        mask = attn_bias
        if attn_bias is not None and not isinstance(attn_bias, torch.Tensor):  # BlockDiagonalMask (blocks.py:739)
            mask = attn_bias.materialize((q.shape[-2], k.shape[-2]), dtype=q.dtype, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        return out.transpose(1, 2).contiguous()

    def token_drop(self, caption, force_drop_ids=None, uncond_prob=None):  # blocks.py:1035-1045, no .cuda()
        uncond_prob = uncond_prob if uncond_prob is not None else self.uncond_prob
        drop = ((torch.rand(caption.shape[0]) < uncond_prob).to(caption.device) if force_drop_ids is None
                else force_drop_ids == 1)
        return torch.where(drop[:, None, None, None], self.y_embedding, caption)

    xops.memory_efficient_attention = memory_efficient_attention
    blocks.CaptionEmbedder.token_drop = token_drop
    return ["xformers memory_efficient_attention -> SDPA for CPU tensors", "CaptionEmbedder.token_drop without .cuda()"]


# ------------------------------------------------------------------------------------ the model


class OpenSoraV13:
    """T5, the v1.3 VAE and STDiT3, loaded once; one method per task kind."""

    def __init__(self, args):
        self.args = args
        sys.path.insert(0, args.opensora)
        import numpy as np
        import torch

        self.np, self.torch = np, torch
        torch.set_grad_enabled(False)  # inference_i2v.py:43; fine-tuning enables it locally
        import opensora.models  # noqa: F401  (registers MODELS)
        import opensora.schedulers  # noqa: F401  (registers SCHEDULERS)
        from opensora.registry import MODELS, SCHEDULERS, build_module
        from opensora.utils.config_utils import read_config
        from opensora.utils.misc import to_torch_dtype

        self.device = torch.device(args.device or os.environ.get("HPARRAY_DEVICE")
                                   or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = read_config(args.config)
        self.train_cfg = read_config(args.train_config) if args.train_config else {}
        self.dtype = to_torch_dtype(args.dtype or self.cfg.get("dtype", "bf16"))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # inference_i2v.py:55-56
            torch.backends.cudnn.allow_tf32 = True
        model_cfg, vae_cfg, t5_cfg = dict(self.cfg.model), dict(self.cfg.vae), dict(self.cfg.text_encoder)
        self.accel = self._accelerations(model_cfg, t5_cfg)
        self.fallbacks = cpu_fallbacks() if self.device.type == "cpu" else []
        for override, cfg in ((args.model, model_cfg), (args.vae, vae_cfg), (args.t5, t5_cfg)):
            if override:
                cfg["from_pretrained"] = override
        t5_kwargs = {"device": self.device}
        if args.t5_dtype != "config":
            t5_kwargs["dtype"] = to_torch_dtype(args.t5_dtype)
        self.text_encoder = build_module(t5_cfg, MODELS, **t5_kwargs)
        self.vae, self.vae_loader = self._load_vae(vae_cfg, build_module, MODELS)
        self.vae = self.vae.to(self.device, self.dtype).eval()
        self.model = build_module(model_cfg, MODELS, input_size=(None, None, None), in_channels=self.vae.out_channels,
                                  caption_channels=self.text_encoder.output_dim,
                                  model_max_length=self.text_encoder.model_max_length,
                                  enable_sequence_parallelism=False).to(self.device, self.dtype).eval()
        self.text_encoder.y_embedder = self.model.y_embedder  # inference_i2v.py:111 (CFG's null embedding)
        sampling = dict(self.cfg.scheduler)
        if args.inference_steps:
            sampling["num_sampling_steps"] = args.inference_steps
        self.scheduler = build_module(sampling, SCHEDULERS)
        training = dict(self.train_cfg.get("scheduler", {"type": "rflow"}))
        if args.ft_drop_condition == "keep" or not training.get("drop_condition"):
            training["drop_condition"] = {"keep": 1.0}  # training_losses needs one for v2v masks
        self.train_scheduler = build_module(training, SCHEDULERS)
        self.snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        log(f"loaded on {self.device} in {self.dtype}: STDiT3 {sum(p.numel() for p in self.model.parameters()):,} "
            f"parameters, VAE via {self.vae_loader}, accelerations {self.accel}, training scheduler {training}")

    def _accelerations(self, model_cfg, t5_cfg):
        """flash-attn, apex's layernorm and T5's shardformer: `auto` keeps each only on CUDA with its package."""
        import importlib.util

        mode, on_cuda = self.args.accel, self.device.type == "cuda"
        have = {"enable_flash_attn": importlib.util.find_spec("flash_attn") is not None,
                "enable_layernorm_kernel": importlib.util.find_spec("apex") is not None}
        chosen = {}
        for key in ("enable_flash_attn", "enable_layernorm_kernel"):
            if mode == "off" or (mode == "auto" and not (on_cuda and have[key])):
                model_cfg[key] = False
            chosen[key] = bool(model_cfg.get(key, False))
        if mode == "off" or (mode == "auto" and not on_cuda):
            t5_cfg["shardformer"] = False
        chosen["t5_shardformer"] = bool(t5_cfg.get("shardformer", False))
        return chosen

    def _load_vae(self, vae_cfg, build_module, models):
        """The registry's OpenSoraVAE_V1_3 (vae.py:239-320) hard-codes the full-size encoder/decoder over the
        folder's config.json: the path of the real checkpoint. A folder declaring another architecture (a
        test's tiny VAE) is loaded with that function's own steps (vae.py:287-299, 317-318) minus the override."""
        path = vae_cfg.get("from_pretrained")
        if vae_cfg.get("type") == "OpenSoraVAE_V1_3" and path and os.path.isdir(path):
            with open(os.path.join(path, "config.json")) as fh:
                encoder = json.load(fh).get("encoder") or {}
            full = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                    "z_channels": vae_cfg.get("z_channels", 16)}
            if encoder and any(encoder.get(k) != v for k, v in full.items()):
                from opensora.models.vae_v1_3.utils import to_torch_dtype
                from opensora.models.vae_v1_3.vae import OpenSoraVAE_V1_3_Pipline

                vae = OpenSoraVAE_V1_3_Pipline.from_pretrained(path)
                vae.micro_batch_size = vae.encoder.micro_batch_size = vae.decoder.micro_batch_size = \
                    vae_cfg.get("micro_batch_size")
                vae.micro_batch_size_2d = vae_cfg.get("micro_batch_size_2d")
                vae.micro_frame_size = vae_cfg.get("micro_frame_size")
                vae.normalization = vae_cfg.get("normalization")
                vae.temporal_overlap = vae_cfg.get("temporal_overlap", False)
                if vae_cfg.get("use_tiled_conv3d", False):
                    vae._enable_tiled_conv3d(tile_size=vae_cfg.get("tile_size", 16), tiled_dim=vae_cfg.get("tiled_dim"),
                                             num_tiles=vae_cfg.get("num_tiles"))
                dtype = to_torch_dtype(vae_cfg.get("dtype", "bf16"))
                vae.encoder.to(dtype)
                vae.decoder.to(dtype)
                return vae, "OpenSoraVAE_V1_3_Pipline.from_pretrained (its own config.json)"
        return build_module(vae_cfg, models), f"registry {vae_cfg.get('type')}"

    # -------------------------------------------------------------------------------- per task

    def _seed(self, seed):
        from mmengine.runner import set_random_seed  # as inference_i2v.py:68

        set_random_seed(seed=seed)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _prompt(self, caption):
        """inference_i2v.py:267-277: the config's aesthetic score appended, then T5's caption cleaning."""
        from opensora.models.text_encoder.t5 import text_preprocessing
        from opensora.utils.inference_utils import append_score_to_prompts

        prompt = append_score_to_prompts([caption or ""], aes=self.cfg.get("aes"), flow=self.cfg.get("flow"),
                                         camera_motion=self.cfg.get("camera_motion"))[0]
        return text_preprocessing(prompt)

    def _meta(self, frames, height, width, fps):
        """Size and fps conditioning, as prepare_multi_resolution_info (inference_utils.py:19-35)."""
        from opensora.utils.inference_utils import prepare_multi_resolution_info

        return prepare_multi_resolution_info(self.cfg.get("multi_resolution", "STDiT2"), 1, (height, width), frames,
                                             fps, self.device, self.dtype)

    def run(self, task, finetune):
        np, torch = self.np, self.torch
        started = time.perf_counter()
        if task.height % 8 or task.width % 8:
            raise ValueError(f"the v1.3 VAE needs heights and widths in multiples of 8, got {task.height}x{task.width}")
        condition = task.read_condition_array().astype(np.float32, copy=False)
        if condition.shape != (task.condition_frames, task.height, task.width, 3):
            raise ValueError(f"condition video has shape {condition.shape}, expected "
                             f"{(task.condition_frames, task.height, task.width, 3)}")
        vae = self.vae
        used, _ = condition_plan(task.condition_frames, self.args.cond_encode, vae.micro_frame_size,
                                 vae.temporal_overlap)
        total = generated_frames(task.num_frames, vae.micro_frame_size or 17)
        latent_size = vae.get_latent_size((total, task.height, task.width))
        fps = int(task.fps or self.cfg.get("fps", 24))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        notes = {"condition_frames_used": used, "generated_frames": total, "latent_size": list(latent_size),
                 "cond_encode": self.args.cond_encode, "dtype": str(self.dtype).replace("torch.", ""),
                 "accelerations": self.accel, "cpu_fallbacks": self.fallbacks, "vae_loader": self.vae_loader}
        timings = {}
        try:
            self._seed(task.seed)
            pixels = torch.from_numpy(np.ascontiguousarray(condition[:used])).permute(3, 0, 1, 2)[None]
            pixels = (pixels * 2.0 - 1.0).to(self.device, self.dtype)  # the datasets' Normalize(0.5, 0.5)
            reference = vae.encode(pixels)  # a posterior sample, as collect_references_batch
            prompt = self._prompt(task.caption)
            notes.update(prompt=prompt, condition_latent_frames=int(reference.shape[2]))
            if reference.shape[2] >= latent_size[0]:
                raise ValueError(f"{reference.shape[2]} conditioning latents leave nothing to generate of "
                                 f"{latent_size[0]}")
            diverged = False
            if finetune:
                noisy_reference = vae.encode(pixels)  # train.py:349-351 encodes twice
                self._sync()
                tuned = time.perf_counter()
                text = self.text_encoder.encode(**self.text_encoder.tokenize_fn([prompt]))
                result = self._finetune(reference, noisy_reference, text, used, task, fps)
                self._sync()
                timings["finetune"] = time.perf_counter() - tuned
                notes.update(result)
                diverged = result["diverged"]
            if not diverged:
                generating = time.perf_counter()
                video = self._generate(reference, prompt, latent_size, total, task, fps)
                timings["inference"] = time.perf_counter() - generating
                if not np.isfinite(video).all():
                    diverged = True
                else:
                    video[: task.condition_frames] = condition  # the whole video, conditioning frames as given
                    task.write_output(video)
        finally:
            if finetune:
                restoring = time.perf_counter()
                notes["restored_exact"] = self._restore()
                timings["restore"] = time.perf_counter() - restoring
        notes["timings_s"] = {**timings, "total": time.perf_counter() - started}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # the process's, not this task's
        return hs.Reply(finetune_s=timings.get("finetune", 0.0), inference_s=timings.get("inference", 0.0),
                        peak_memory_mb=peak, diverged=diverged, notes=notes)

    def _finetune(self, reference, noisy_reference, text, used, task, fps):
        """scripts/train.py:306-418 on the one clip, `finetune_steps` times: v2v_head mask, Open-Sora's
        rectified-flow loss with the training config's timestep sampling and condition dropping, AdamW
        (as HybridAdam(adamw_mode=True)) with the config's eps, weight decay and gradient clipping."""
        torch = self.torch
        from opensora.utils.train_utils import get_mask_index

        config = self.train_cfg
        model_settings = dict(config.get("model", {}))
        latent_t = reference.shape[2]
        mask_index = get_mask_index(self.args.ft_mask, latent_t) if (used > 1 and self.args.ft_mask != "none") else []
        text_uncond_prob = 0.0 if mask_index else model_settings.get("class_dropout_prob", 0.1)  # train.py:308-317

        class Boosted(torch.nn.Module):  # training_losses reads model.module.y_embedder (rectified_flow.py:69)
            def __init__(self, module):
                super().__init__()
                self.module = module

            def forward(self, *args, **kwargs):
                return self.module(*args, **kwargs)

        model = self.model
        frozen = []
        if model_settings.get("freeze_y_embedder", False):
            frozen = [p for p in model.y_embedder.parameters() if p.requires_grad]
            for param in frozen:
                param.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        mixed = self.dtype != torch.float32  # fp32 master weights, as the zero plugin of train.py keeps them
        master = [p.detach().float().clone() for p in params] if mixed else params
        optimizer = torch.optim.AdamW(master, lr=float(task.lr), betas=(0.9, 0.999), eps=config.get("adam_eps", 1e-8),
                                      weight_decay=config.get("weight_decay", 0))
        clip = config.get("grad_clip", 0)
        checkpointing = self.args.grad_checkpoint == "on" or (self.args.grad_checkpoint == "config"
                                                               and bool(config.get("grad_checkpoint", False)))
        losses, diverged = [], False
        model.train()
        for module in model.modules():
            module.grad_checkpointing = checkpointing
        try:
            with torch.enable_grad():
                for _ in range(task.finetune_steps):
                    args = {"y": text["y"], "mask": text["mask"], **self._meta(used, task.height, task.width, fps)}
                    loss = self.train_scheduler.training_losses(
                        Boosted(model), reference, model_args=args, mask=None, mask_index=mask_index, x_gt=reference,
                        noise_disable_threshold=config.get("noise_disable_threshold"),
                        text_uncond_prob=text_uncond_prob, x_noisy_ref=noisy_reference)["loss"].mean()
                    value = float(loss.detach().float().item())
                    losses.append(value)
                    if value != value or abs(value) == float("inf"):
                        diverged = True
                        break
                    loss.backward()
                    if mixed:
                        for copy, param in zip(master, params):
                            copy.grad = param.grad.float() if param.grad is not None else None
                            param.grad = None
                    if clip:
                        torch.nn.utils.clip_grad_norm_(master, clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if mixed:
                        with torch.no_grad():
                            for copy, param in zip(master, params):
                                param.copy_(copy)
        finally:
            for param in params:
                param.grad = None
            for param in frozen:
                param.requires_grad_(True)
            for module in model.modules():
                module.grad_checkpointing = False
            model.eval()
        return {"losses": losses, "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "finetune_mask_index": list(mask_index), "text_uncond_prob": text_uncond_prob,
                "gradient_checkpointing": checkpointing, "master_fp32": mixed, "diverged": diverged}

    def _generate(self, reference, prompt, latent_size, total, task, fps):
        """inference_i2v.py:289-365 with cond_type v2v_head and loop 1; the same seed gives every
        config of a video the same noise."""
        np, torch = self.np, self.torch
        from opensora.utils.inference_utils import prep_ref_and_mask

        self._seed(task.seed)
        channels = self.vae.out_channels
        target = [1, channels, *latent_size]
        ref, mask_index = prep_ref_and_mask("v2v_head", reference.shape[2], [[reference[0]]], target, 1, self.device,
                                            self.dtype)
        z = torch.randn(1, channels, *latent_size, device=self.device, dtype=self.dtype)
        cond_mask = torch.zeros(1, channels, *latent_size, device=self.device).to(self.dtype)
        cond_mask[:, :, mask_index, :, :] = 1.0
        samples = self.scheduler.sample(
            self.model, self.text_encoder, z=z, z_cond=ref, z_cond_mask=cond_mask, prompts=[prompt],
            device=self.device, additional_args=self._meta(total, task.height, task.width, fps), progress=False,
            mask=None, mask_index=mask_index, image_cfg_scale=self.cfg.get("image_cfg_scale", 7.5), neg_prompts=None,
            use_sdedit=self.cfg.get("use_sdedit", False),
            use_oscillation_guidance_for_text=self.cfg.get("use_oscillation_guidance_for_text"),
            use_oscillation_guidance_for_image=self.cfg.get("use_oscillation_guidance_for_image"))
        video = self.vae.decode(samples.to(self.dtype), num_frames=total)[0]
        video = video[:, : task.num_frames, : task.height, : task.width].float().clamp(-1, 1).add(1).div(2)
        self._sync()
        return video.permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)

    def _restore(self):
        self.model.load_state_dict(self.snapshot, strict=True)
        state = self.model.state_dict()
        if not all(self.torch.equal(state[k], v) for k, v in self.snapshot.items()):
            raise RuntimeError("the base weights were not restored exactly")
        return True
