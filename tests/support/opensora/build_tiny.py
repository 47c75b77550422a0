#!/usr/bin/env python
"""Build tiny, randomly initialised Open-Sora v1.3 checkpoints for CPU tests.

Uses Open-Sora's OWN classes (from the checkout given by --opensora or already importable):
  * STDiT3 / STDiT3Config           (opensora/models/stdit/stdit3.py)
  * OpenSoraVAE_V1_3_Pipline(+Config) with VideoEncoder / VideoDecoder at tiny widths
                                    (opensora/models/vae_v1_3/vae.py, encoder.py, decoder.py)
  * transformers' T5EncoderModel at tiny size + a T5 sentencepiece tokenizer trained locally
    (nothing is downloaded).

Everything is saved with `save_pretrained` as Hugging Face folders (config.json + model.safetensors),
which is the format the v1.3 inference configs load with `force_huggingface=True`:
  * <out>/stdit3 : loaded by MODELS "STDiT3-XL/2" -> STDiT3.from_pretrained(folder, **kwargs)
                   (stdit3.py:609-620); depth/hidden/heads come from config.json, the config's
                   kwargs (qk_norm, kernel_size, use_spatial_rope, caption_channels, ...) override.
  * <out>/vae    : an OpenSoraVAE_V1_3_Pipline folder. NOTE: the registry function
                   OpenSoraVAE_V1_3 (vae.py:239-320) hard-codes the full-size encoder/decoder
                   (ch=128, ...) and passes them as kwargs to from_pretrained, which override the
                   folder's config.json -> it cannot load a tiny VAE. The server therefore loads a
                   folder whose config.json declares a different architecture with the same steps
                   as that function's HF branch (vae.py:287-299, 317-318) but without the override.
  * <out>/t5     : a T5EncoderModel + tokenizer folder, loaded by MODELS "t5" -> T5Encoder
                   (t5.py:135-165) -> AutoTokenizer/T5EncoderModel.from_pretrained(folder).

Usage (with the Open-Sora environment's interpreter):
    python tests/support/opensora/build_tiny.py --opensora /src/Open-Sora --out /tmp/tiny
"""
import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--opensora", required=True, help="Open-Sora v1.3 checkout")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t5-dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=96,
                    help="STDiT3 hidden size (head_dim must be divisible by 3 for 3D rope)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--vae-ch", type=int, default=32, help="VAE base width (GroupNorm(32) needs a multiple of 32)")
    ap.add_argument("--vae-ch-mult", default="1,1,1,1",
                    help="VAE width multipliers; 4 levels as v1.3's [1,2,4,4] (8x spatial, 4x temporal)")
    args = ap.parse_args()

    if args.opensora and args.opensora not in sys.path:
        sys.path.insert(0, args.opensora)

    import torch

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    # ---------------------------------------------------------------- T5 (tiny) + tokenizer
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    t5_dir = os.path.join(args.out, "t5")
    os.makedirs(t5_dir, exist_ok=True)
    words = (
        "a the dog cat runs walks jumps on in over under grass road city street car red blue green big small "
        "man woman child bird flies sky water river sea boat tree forest mountain snow sun night day light dark "
        "camera moves slowly fast left right close up view aesthetic score is excellent good fair motion strength "
        "high low video of with and to from at by"
    ).split()
    import random as _random

    rng = _random.Random(args.seed)
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    sp_prefix = os.path.join(t5_dir, "spiece_tmp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=sp_prefix,
        vocab_size=90,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    tok = T5TokenizerFast(vocab_file=sp_prefix + ".model", extra_ids=100)
    tok.save_pretrained(t5_dir)
    for ext in (".model", ".vocab"):
        os.remove(sp_prefix + ext)
    t5_cfg = T5Config(
        vocab_size=len(tok),
        d_model=args.t5_dim,
        d_kv=8,
        d_ff=2 * args.t5_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # as t5-v1_1
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    t5 = T5EncoderModel(t5_cfg).eval()
    t5.save_pretrained(t5_dir, safe_serialization=True)
    print("saved T5 ->", t5_dir, sum(p.numel() for p in t5.parameters()), "params")

    # ---------------------------------------------------------------- STDiT3 (tiny)
    from opensora.models.stdit.stdit3 import STDiT3, STDiT3Config

    st_dir = os.path.join(args.out, "stdit3")
    st_cfg = STDiT3Config(
        depth=args.depth,
        hidden_size=args.hidden,
        num_heads=args.heads,
        patch_size=(1, 2, 2),
        in_channels=16,
        caption_channels=args.t5_dim,
        model_max_length=300,
        qk_norm=True,
        kernel_size=(8, 8, -1),
        use_spatial_rope=True,
        class_dropout_prob=0.0,
    )
    st = STDiT3(st_cfg)
    # STDiT3.initialize_weights zero-inits the conditioning embedders (x_embedder_cond, x_embedder_cond_mask),
    # the temporal blocks' output projections and the fps embedder output. A zero there would make a random
    # tiny model ignore the v2v condition, so give every all-zero weight matrix small random values.
    with torch.no_grad():
        for _name, p in st.named_parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.02)
    st.save_pretrained(st_dir, safe_serialization=True)
    print("saved STDiT3 ->", st_dir, sum(p.numel() for p in st.parameters()), "params")

    # ---------------------------------------------------------------- VAE v1.3 (tiny)
    from opensora.models.vae_v1_3.vae import OpenSoraVAE_V1_3_Pipline, OpenSoraVAE_V1_3_PiplineConfig

    vae_dir = os.path.join(args.out, "vae")
    ch = args.vae_ch
    ch_mult = [int(c) for c in args.vae_ch_mult.split(",")]
    assert len(ch_mult) == 4, "keep 4 levels: the down/upsampling layers [1, 2] / [2, 3] assume them"
    encoder_config = dict(
        type="VideoEncoder",
        double_z=True,
        z_channels=16,  # must stay 16: normalization="video" uses 16-channel stats (vae_v1_3/constants.py)
        in_channels=3,
        out_ch=3,
        ch=ch,
        ch_mult=ch_mult,  # 4 levels as v1.3 ([1, 2, 4, 4] there): 8x spatial, 4x temporal
        num_res_blocks=1,
        down_sampling_layer=[1, 2],
        micro_batch_size_2d=None,
    )
    decoder_config = dict(
        type="VideoDecoder",
        z_channels=16,
        in_channels=3,
        out_ch=3,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=1,
        temporal_up_layers=[2, 3],
        micro_batch_size_2d=None,
    )
    vae_cfg = OpenSoraVAE_V1_3_PiplineConfig(encoder=encoder_config, decoder=decoder_config)
    vae = OpenSoraVAE_V1_3_Pipline(vae_cfg)
    vae.save_pretrained(vae_dir, safe_serialization=True)
    print("saved VAE ->", vae_dir, sum(p.numel() for p in vae.parameters()), "params")

    with open(os.path.join(args.out, "MANIFEST.json"), "w") as f:
        json.dump(
            dict(
                seed=args.seed,
                t5=dict(d_model=args.t5_dim, layers=2, heads=4, vocab=len(tok)),
                stdit3=dict(depth=args.depth, hidden_size=args.hidden, num_heads=args.heads),
                vae=dict(ch=ch, ch_mult=ch_mult, num_res_blocks=1, z_channels=16),
                opensora=os.path.abspath(args.opensora),
            ),
            f,
            indent=2,
        )



if __name__ == "__main__":
    main()
