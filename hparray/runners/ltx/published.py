"""LTX-Video's published 2 B architecture, for benches and estimates without its weights.

diffusers' `LTXVideoTransformer3DModel()` defaults are the 2 B transformer of LTX-Video 0.9.0 to
0.9.5 (key by key, the configuration of diffusers' conversion script); its VAE defaults are the
0.9.0 VAE, while the checkpoints `LTXConditionPipeline` serves use the 0.9.5 one below. T5-XXL
(t5-v1_1-xxl) is the text encoder they ship.
"""

from __future__ import annotations

from typing import Any

TRANSFORMER_2B: dict[str, Any] = {}
"""The constructor's defaults: 28 blocks, 32 heads x 64, cross-attention 2048, captions 4096."""

VAE_095: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(128, 256, 512, 1024, 2048),
    down_block_types=("LTXVideo095DownBlock3D",) * 4, decoder_block_out_channels=(256, 512, 1024),
    layers_per_block=(4, 6, 6, 2, 2), decoder_layers_per_block=(5, 5, 5, 5),
    spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
    patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, scaling_factor=1.0, encoder_causal=True,
    decoder_causal=False, spatial_compression_ratio=32, temporal_compression_ratio=8,
)

T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                              feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)


def build(device: str = "cpu", text_encoder: bool = False) -> tuple[Any, Any, Any]:
    """(transformer, VAE, T5-XXL encoder or None) with random weights; on the "meta" device they
    take no memory and build in a second (parameter shapes only)."""
    import torch
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel

    with torch.device(device):
        transformer = LTXVideoTransformer3DModel(**TRANSFORMER_2B)
        vae = AutoencoderKLLTXVideo(**VAE_095)
        t5 = None
        if text_encoder:
            from transformers import T5Config, T5EncoderModel

            t5 = T5EncoderModel(T5Config(**T5_XXL))
    return transformer, vae, t5
