"""GPU memory of one LTX-Video row, estimated before anything is queued (docs/memory.md).

Parameter counts come from the checkpoint's own safetensors headers (read without torch, in
milliseconds), the geometry from its config.json files. Activations use bytes per token fitted on
the CPU against autograd's saved tensors and the allocator's peak, for LTX-Video's own blocks
(within 3-7% on held-out sizes). A fine-tune row's peak is its weights, the base-weight snapshot,
AdamW's two moments, and the larger of the forward's activations (plus the autocast weight
copies) and the gradients; a baseline row's peak is its weights plus one inference forward or the
VAE decode. The text encoder is on the GPU alone, in bf16, while the prompts are encoded before
the model moves there.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hparray.runners.ltx.flow import conditioning_plan, generated_frame_count
from hparray.runners.ltx.precision import Precision
from hparray.runners.protocol import MemoryEstimate

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}

# Saved activations of a fine-tune forward, in bytes per training token per unit of model width
# D: `a` per transformer block, `b` once (embeddings, caption projection, output head). Fitted on
# LTX-Video blocks 2048 wide (the 2B model's width) with autograd's saved-tensor hooks.
_ACTIVATIONS = {  # (mode, autocast): (a, b)
    ("full", False): (156, 51), ("full", True): (120, 36),
    ("lora", False): (106, 10), ("lora", True): (79, 4),
}
_CHECKPOINTED_B = {("full", False): 67, ("full", True): 38, ("lora", False): 17, ("lora", True): 17}
_INFERENCE_BYTES_PER_TOKEN = {False: 110, True: 59}  # per token per D, one no-grad forward
CUDA_CONTEXT_GIB = 1.0
"""The CUDA context and the allocator's slack, which max_memory_allocated does not count."""

_LORA_TARGET = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")


@dataclass(frozen=True)
class Tensors:
    """A component's tensors from its safetensors headers: name -> (dtype, shape)."""

    shapes: dict[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def read(cls, folder: Path) -> Tensors:
        shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with file.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            shapes.update({name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()
                           if name != "__metadata__"})
        return cls(shapes)

    @property
    def count(self) -> int:
        total = 0
        for _, shape in self.shapes.values():
            size = 1
            for dim in shape:
                size *= dim
            total += size
        return total

    @property
    def stored_bytes(self) -> int:
        """Bytes per parameter as stored (the largest dtype present)."""
        return max((BYTES.get(dtype, 4) for dtype, _ in self.shapes.values()), default=4)

    def lora_parameters(self, rank: int) -> int:
        """Parameters of a rank-`rank` adapter on every attention's q, k, v and output projection."""
        return sum(rank * (shape[0] + shape[1]) for name, (_, shape) in self.shapes.items()
                   if _LORA_TARGET.search(name) and len(shape) == 2)


@dataclass(frozen=True)
class Checkpoint:
    """What the estimate reads of a checkpoint: the configs and tensor shapes of its parts."""

    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    transformer: Tensors
    vae: Tensors
    text_encoder: Tensors | None = None

    @classmethod
    def read(cls, folder: Path, text_encoder: bool) -> Checkpoint:
        def config(part: str) -> dict[str, Any]:
            return dict(json.loads((folder / part / "config.json").read_text(encoding="utf-8")))

        return cls(config("transformer"), config("vae"), Tensors.read(folder / "transformer"),
                   Tensors.read(folder / "vae"), Tensors.read(folder / "text_encoder") if text_encoder else None)

    @classmethod
    def of_modules(cls, transformer: Any, vae: Any, text_encoder: Any = None, stored: str | None = None
                   ) -> Checkpoint:
        """The same from built modules (e.g. on the meta device: no memory), for benches and tests;
        `stored` ("BF16", as LTX-Video's checkpoints are saved) overrides the modules' own dtypes."""
        def tensors(module: Any) -> Tensors:
            names = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}
            return Tensors({name: (stored or names.get(str(t.dtype), "F32"), tuple(t.shape))
                            for name, t in module.state_dict().items()})

        return cls(dict(transformer.config), dict(vae.config), tensors(transformer), tensors(vae),
                   tensors(text_encoder) if text_encoder is not None else None)


def vae_ratios(vae: dict) -> tuple[int, int]:
    """(spatial, temporal) compression, as AutoencoderKLLTXVideo derives them from its config."""
    scaling = vae.get("spatio_temporal_scaling", (True, True, True, False))
    patch, patch_t = int(vae.get("patch_size", 4)), int(vae.get("patch_size_t", 1))
    spatial = vae.get("spatial_compression_ratio") or patch * 2 ** sum(bool(s) for s in scaling)
    temporal = vae.get("temporal_compression_ratio") or patch_t * 2 ** sum(bool(s) for s in scaling)
    return int(spatial), int(temporal)


def estimate(folder: Path, precision: Precision, *, text_encoder: bool, **row: Any) -> MemoryEstimate | None:
    """The estimate for a checkpoint folder (see `estimate_for`); None without safetensors files."""
    try:
        checkpoint = Checkpoint.read(folder, text_encoder)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    if not checkpoint.transformer.shapes or not checkpoint.vae.shapes:
        return None
    return estimate_for(checkpoint, precision, **row)


def estimate_for(checkpoint: Checkpoint, precision: Precision, *, lora_rank: int, gradient_checkpointing: bool,
                 height: int, width: int, num_frames: int, condition_frames: int) -> MemoryEstimate:
    """A row conditioned on `condition_frames` frames, generating `num_frames` at height x width."""
    transformer_cfg, vae_cfg = checkpoint.transformer_config, checkpoint.vae_config
    transformer, vae, t5 = checkpoint.transformer, checkpoint.vae, checkpoint.text_encoder
    width_d = int(transformer_cfg.get("num_attention_heads", 32)) * int(transformer_cfg.get("attention_head_dim", 64))
    layers = int(transformer_cfg.get("num_layers", 28))
    patch = int(transformer_cfg.get("patch_size", 1))
    spatial, temporal = vae_ratios(vae_cfg)
    per_frame = (height // spatial // patch) * (width // spatial // patch)
    plan = conditioning_plan(condition_frames, temporal)
    train_tokens = ((plan.prefix - 1) // temporal + 1 + len(plan.leftover)) * per_frame
    infer_tokens = ((generated_frame_count(num_frames, temporal) - 1) // temporal + 1) * per_frame + train_tokens

    b = BYTES
    n = transformer.count
    low = precision.autocast_on
    trainable = n if precision.finetune == "full" else transformer.lora_parameters(lora_rank)
    weights = n * b[precision.transformer] + (trainable * b[precision.trainable] if precision.finetune == "lora" else 0)
    # The runner snapshots the base weights for full fine-tuning only, in bf16 when that is exact.
    snapshot = n * min(b[precision.transformer], transformer.stored_bytes) if precision.finetune == "full" else 0
    vae_weights = vae.count * b[precision.compute]
    grads = trainable * b[precision.trainable]
    adam = 2 * trainable * b[precision.trainable]
    copies = 2 * n if (precision.finetune == "full" and low) else 0
    a, b_once = _ACTIVATIONS[(precision.finetune, low)]
    if gradient_checkpointing:
        block_input = 2 if (precision.finetune == "lora" and low) else 4
        activations = train_tokens * width_d * (layers * block_input + a + _CHECKPOINTED_B[(precision.finetune, low)])
    else:
        activations = train_tokens * width_d * (layers * a + b_once)
    resident = weights + snapshot + vae_weights
    finetune = resident + adam + max(activations + copies, grads + train_tokens * width_d * a)
    decoder_channels = (vae_cfg.get("decoder_block_out_channels") or vae_cfg.get("block_out_channels") or [128])[0]
    vae_patch = int(vae_cfg.get("patch_size", 4))
    pixels = num_frames * (height // vae_patch) * (width // vae_patch)
    decode = 2 * pixels * int(decoder_channels) * b[precision.compute]  # one conv's input and output
    inference = resident + max(infer_tokens * width_d * _INFERENCE_BYTES_PER_TOKEN[low], decode)
    t5_bytes = t5.count * 2 if t5 is not None else 0  # in bf16, before the model moves to the GPU
    encoding = t5_bytes
    parts = [("transformer weights", weights), ("base-weight snapshot", snapshot), ("VAE weights", vae_weights),
             ("gradients", grads), ("AdamW moments", adam), ("autocast weight copies", copies),
             ("activations", activations)]
    if t5 is not None:
        parts.append(("text encoder, while encoding prompts", t5_bytes))
    peak = max(finetune, inference, encoding)
    return MemoryEstimate(
        parts=tuple((name, value / GIB) for name, value in parts),
        finetune_gib=finetune / GIB, inference_gib=inference / GIB, encoding_gib=encoding / GIB,
        peak_gib=peak / GIB + CUDA_CONTEXT_GIB,
        baseline_peak_gib=max(inference, encoding) / GIB + CUDA_CONTEXT_GIB,
        summary=(f"{n / 1e9:.2f} B-parameter transformer, {trainable / 1e6:.1f} M trainable "
                 f"({precision.finetune}, {precision.trainable} master weights, {precision.compute} compute"
                 f"{', gradient checkpointing' if gradient_checkpointing else ''}), {train_tokens} training and "
                 f"{infer_tokens} inference tokens at {height}x{width}x{num_frames}, {condition_frames} "
                 "conditioning frames"))
