"""Text conditioning for LTX-Video checkpoints that ship a T5 text encoder.

LTX-Video was trained on T5 embeddings of captions, and even the empty string does not encode
to zeros, so a real checkpoint must see real embeddings. Each prompt is encoded once per worker
and cached on the CPU (a few MB each); the text encoder (T5-XXL: 4.7 B parameters) is loaded
only to encode prompts not seen yet and dropped right after, so fine-tuning memory is the
transformer's. The built-in model has no text encoder: it runs on an all-zero embedding.
"""

from __future__ import annotations

import gc
import json
import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hparray.errors import ConfigError, RunnerError

if TYPE_CHECKING:
    import torch

    from hparray.videos import VideoRef

MAX_PROMPT_TOKENS = 256
"""Tokens every prompt is padded to, as LTXConditionPipeline pads them (its default)."""

PROMPT_FIELDS = ("category", "video")
"""What a `model.prompt` template may name."""


def has_text_encoder(checkpoint: Path | None) -> bool:
    """Whether a diffusers-layout checkpoint lists a text encoder and a tokenizer, and has both folders."""
    if checkpoint is None:
        return False
    try:
        index = json.loads((checkpoint / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    listed = all(isinstance(index.get(part), list) and index[part][0] for part in ("text_encoder", "tokenizer"))
    return listed and (checkpoint / "text_encoder").is_dir() and (checkpoint / "tokenizer").is_dir()


def check_template(template: str | None) -> None:
    """Refuse a `model.prompt` template with placeholders it cannot fill."""
    if template is None:
        return
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"model.prompt {template!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = sorted(fields - set(PROMPT_FIELDS))
    if unknown:
        raise ConfigError(f"model.prompt {template!r} names {{{unknown[0]}}}: a prompt template knows only "
                          f"{', '.join('{' + name + '}' for name in PROMPT_FIELDS)}")


def prompt_for(ref: VideoRef, template: str | None) -> str:
    """The video's caption from the manifest, else the `model.prompt` template, else ""."""
    if ref.caption:
        return ref.caption
    if template is not None:
        return template.format(category=ref.category, video=ref.name)
    return ""


class PromptEncoder:
    """T5 embeddings of prompts, each computed once: (embeddings (1, 256, C), mask (1, 256)) on the CPU."""

    def __init__(self, checkpoint: Path, dtype: torch.dtype) -> None:
        self.checkpoint, self.dtype = checkpoint, dtype
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.loads = 0  # how many times the text encoder was loaded (once per worker, normally)

    def encode(self, prompts: Iterable[str], device: str) -> None:
        """Encode the prompts not cached yet, in one visit of the text encoder to `device`."""
        missing = sorted({prompt for prompt in prompts if prompt not in self.cache})
        if not missing:
            return
        import torch

        tokenizer, text_encoder = self._load()
        try:
            text_encoder.to(device)
            with torch.no_grad():
                for prompt in missing:
                    self.cache[prompt] = self._encode_one(tokenizer, text_encoder, prompt, device)
        finally:
            del text_encoder, tokenizer  # nothing else holds them: the memory goes now
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    def embeddings(self, prompt: str, device: str, dtype: torch.dtype, encode_on: str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's embeddings and mask on `device`, the embeddings in `dtype`; a prompt not
        encoded yet is encoded on `encode_on`."""
        if prompt not in self.cache:
            self.encode([prompt], encode_on)
        embeds, mask = self.cache[prompt]
        return embeds.to(device, dtype), mask.to(device)

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as transformers_logging

        bar = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # a loading bar per encoding, in every worker log
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.checkpoint / "tokenizer"))
            text_encoder = T5EncoderModel.from_pretrained(str(self.checkpoint / "text_encoder"), dtype=self.dtype)
        except (OSError, ValueError, ImportError) as exc:
            raise RunnerError(f"cannot load the text encoder of {self.checkpoint}: {exc} (a tokenizer with only "
                              "spiece.model needs the sentencepiece and protobuf packages)") from exc
        finally:
            if bar:
                transformers_logging.enable_progress_bar()
        text_encoder.eval().requires_grad_(False)
        self.loads += 1
        return tokenizer, text_encoder

    @staticmethod
    def _encode_one(tokenizer: Any, text_encoder: Any, prompt: str, device: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What LTXConditionPipeline._get_t5_prompt_embeds computes, for one prompt."""
        tokens = tokenizer([prompt], padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.bool().to(device)
        embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds.float().cpu(), mask.long().cpu()
