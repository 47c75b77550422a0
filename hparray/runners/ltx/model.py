"""The LTX-Video models hparray knows: a checkpoint folder in diffusers layout, and the built-in
tiny model whose trained weights ship with hparray (`hparray/demo/weights/demo-ltx`, checked
against the sha256s of its manifest before every load)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hparray.errors import RunnerError

if TYPE_CHECKING:
    import torch
    from diffusers import LTXConditionPipeline


TINY_SEED = 0
"""Seed of the built-in tiny model's random initialisation: the same weights on every node."""

TINY_LATENT_CHANNELS = 32

DEMO_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "demo" / "weights" / "demo-ltx"
"""The trained built-in model shipped inside the package (see hparray.demo.model)."""

MANIFEST = "manifest.json"


def tiny_modules() -> tuple[Any, Any]:
    """The built-in model's transformer and VAE, randomly initialised from the global RNG.

    Sized so that a CPU trains it in minutes on 64x64 videos (`hparray.demo.model`), a sweep
    task takes seconds and the weights stay under 5 MB: the VAE compresses 8x in space and 4x
    in time (49 frames of 64x64 become 13 latent frames of 8x8x32), the transformer is 96
    wide with two layers. Its blocks' RMSNorm epsilon is 1e-12, so that storing the writers of
    the residual stream smaller (`hparray.demo.model.reparametrize`) changes almost nothing; the
    fixed epsilons of the query/key norms (1e-5) and the output LayerNorm (1e-6) remain.
    """
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=24,
        cross_attention_dim=96,
        num_layers=2,
        caption_channels=32,
        norm_eps=1e-12,
    )
    scaling = (True, True)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=TINY_LATENT_CHANNELS,
        block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 24),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=scaling,
        decoder_spatio_temporal_scaling=scaling,
        decoder_inject_noise=(False,) * 3,
        upsample_residual=(False,) * 2,
        upsample_factor=(1,) * 2,
        timestep_conditioning=False,
        patch_size=2,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    return transformer, vae


def load_pipeline(path: Path, dtype: torch.dtype | dict[str, torch.dtype] | None = None) -> LTXConditionPipeline:
    """A diffusers-layout LTX-Video checkpoint, without its text encoder (`text.PromptEncoder`
    loads that only to encode prompts), ready for bit-exact CPU runs. `dtype` may name one per
    component ({"transformer": ..., "default": ...}), so fp32 master weights are read as such.

    safetensors hands back views into the file at whatever alignment the header leaves, and
    CPU kernels round differently on unaligned data (2e-7 here); giving every tensor its own
    storage makes a loaded model compute exactly what the same weights built in memory do.
    """
    import torch
    from diffusers import LTXConditionPipeline
    from diffusers.utils import logging as diffusers_logging

    # A per-component loading bar in every worker log says nothing: hide it, then restore.
    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = LTXConditionPipeline.from_pretrained(
            str(path), text_encoder=None, tokenizer=None, dtype=dtype or torch.float32
        )
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
    for module in (pipe.transformer, pipe.vae):
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor.data = tensor.data.clone()
    return _ready(pipe)


def build_tiny_pipeline(weights_dir: Path | None, seed: int = TINY_SEED) -> LTXConditionPipeline:
    """The built-in tiny LTX pipeline: trained weights from `weights_dir`, else seeded random ones.

    A `weights_dir` holding a manifest.json is checked against it before loading. Random
    initialisation happens under a forked RNG seeded with `seed`, so the weights are
    bit-identical on every call and the caller's global RNG is left untouched.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline

    if weights_dir is not None:
        if (weights_dir / MANIFEST).is_file():
            verify_manifest(weights_dir)
        return load_pipeline(weights_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vae = tiny_modules()
    return _ready(
        LTXConditionPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
        )
    )


@functools.cache
def builtin_model_id() -> str:
    """Which model `model.path: null` means in this checkout: a digest of the shipped weights'
    sha256s, or "missing" (the runner then refuses to load). Config hashes include it, so
    retrained weights never reuse results of the old ones."""
    try:
        files = json.loads((DEMO_WEIGHTS_DIR / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "missing"
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(weights_dir: Path) -> list[str]:
    """Every file of a checkpoint folder except the manifest, as sorted POSIX relative paths."""
    return sorted(
        path.relative_to(weights_dir).as_posix()
        for path in weights_dir.rglob("*")
        if path.is_file() and path.name != MANIFEST
    )


def verify_manifest(weights_dir: Path) -> dict[str, Any]:
    """Check every file of `weights_dir` against the sha256s in its manifest.json.

    A swapped or corrupted weights file would silently change every score of every sweep,
    so any difference (changed, missing or unlisted file) refuses the whole folder.
    """
    retrain = (
        "reinstall hparray, or retrain the weights with `python -m hparray.demo.train "
        f"--out {weights_dir}`"
    )
    try:
        manifest = json.loads((weights_dir / MANIFEST).read_text(encoding="utf-8"))
        expected = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunnerError(
            f"model weights in {weights_dir}: cannot read the sha256s in {MANIFEST} ({exc}): "
            f"{retrain}"
        ) from exc
    problems: list[str] = []
    for rel, sha in sorted(expected.items()):
        path = weights_dir / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif (actual := file_sha256(path)) != sha:
            problems.append(f"{rel} has sha256 {actual[:12]}..., the manifest says {str(sha)[:12]}...")
    problems += [f"{rel} is not in the manifest" for rel in checkpoint_files(weights_dir)
                 if rel not in expected]
    if problems:
        raise RunnerError(
            f"model weights in {weights_dir} do not match their {MANIFEST}: "
            f"{'; '.join(problems)}; {retrain}"
        )
    return manifest


def _ready(pipe: LTXConditionPipeline) -> LTXConditionPipeline:
    # Framewise VAE tiling changes results and buys nothing at these sizes.
    pipe.vae.use_framewise_encoding = False
    pipe.vae.use_framewise_decoding = False
    # Eval mode, as from_pretrained returns them: a freshly built module is in train mode.
    pipe.vae.eval()
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe

