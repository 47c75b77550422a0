"""A tiny T5 text encoder and tokenizer, built offline, for an LTX-Video checkpoint with text.

Real checkpoints ship T5-XXL (4.7 B parameters), which no test can download or hold; this builds
the same classes (transformers' T5EncoderModel, and a T5 Unigram tokenizer trained here with the
`tokenizers` library on a few sentences, <pad>=0, </s>=1 as in T5) small enough for a CPU, so the
`ltx` runner's text path runs through diffusers' and transformers' own loading code in tests and
benches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SENTENCES = (
    "a red ball rolls across the wooden floor",
    "a dog runs on the beach at sunset",
    "waves crash against the rocks under a grey sky",
    "a person walks through a busy city street at night",
    "the camera pans slowly over a green forest",
    "a cat sleeps on a sofa next to a window",
    "cars drive along a highway in the rain",
    "a chef cuts vegetables in a bright kitchen",
    "a video of pan zoom rotate translate",
)


def build_tokenizer() -> Any:
    """A T5-layout Unigram tokenizer trained on SENTENCES (ids <pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    raw = Tokenizer(Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                             show_progress=False)
    raw.train_from_iterator(list(SENTENCES), trainer=trainer)
    vocab = [tuple(item) for item in json.loads(raw.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=128)


def build_text_encoder(vocab_size: int, d_model: int, seed: int = 0, layers: int = 2) -> Any:
    """A randomly initialised (seeded) T5 encoder of width `d_model`, gated-GELU as t5-v1_1."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model if d_model < 1024 else 256,
                      num_layers=layers, num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def save_checkpoint_with_text(folder: Path, pipe: Any | None = None, seed: int = 0) -> Path:
    """Save `pipe` (default: the built-in tiny LTX-Video with seeded random weights) with a tiny
    T5 as its text encoder, in diffusers layout; the T5's width is the transformer's caption_channels."""
    from diffusers import LTXConditionPipeline

    from hparray.runners.ltx.model import build_tiny_pipeline

    pipe = pipe or build_tiny_pipeline(None, seed=seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), pipe.transformer.config.caption_channels, seed=seed)
    LTXConditionPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=pipe.transformer).save_pretrained(str(folder))
    return folder
