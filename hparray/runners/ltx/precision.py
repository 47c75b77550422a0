"""Which dtype each part of LTX-Video is kept and computed in.

Updates at the low end of an lr search are smaller than a bf16 weight's rounding step (2^-8 of
its magnitude): AdamW on bf16 weights leaves them bit-for-bit unchanged. So the weights the
optimizer updates (the whole transformer, or the LoRA adapters) are kept in `trainable_dtype`
(float32 by default) as master weights, the forward and backward passes run under autocast in
`model.dtype`, and what is frozen (the VAE; the transformer's base under LoRA) stays in
`model.dtype`. With `model.dtype: float32` nothing is autocast and nothing changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Precision:
    """model.dtype (compute, and frozen weights), model.trainable_dtype, and the fine-tuning mode."""

    compute: str
    trainable: str
    finetune: str

    @property
    def autocast_on(self) -> bool:
        return self.compute != "float32"

    @property
    def transformer(self) -> str:
        """The transformer's weights: all trainable under full fine-tuning, frozen under LoRA."""
        return self.trainable if self.finetune == "full" else self.compute

    def dtype(self, name: str) -> torch.dtype:
        import torch

        return getattr(torch, name)

    def autocast(self, device: str) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the compute dtype on `device` (nothing for float32)."""
        if not self.autocast_on:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=device.split(":")[0], dtype=self.dtype(self.compute))

    def grad_scaler(self, device: str) -> Any:
        """A loss scaler for float16 compute (its gradients underflow otherwise), else None."""
        if self.compute != "float16":
            return None
        import torch

        return torch.amp.GradScaler(device.split(":")[0])

    def describe(self) -> dict[str, Any]:
        """What each result's details record."""
        return {"compute": self.compute, "trainable": self.trainable, "frozen": self.compute,
                "autocast": self.autocast_on, "loss_scaling": self.compute == "float16"}


def compact_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor`, in bfloat16 when that holds it exactly (load_state_dict casts it back):
    a bf16 checkpoint's fp32 master weights are snapshot at half the memory."""
    import torch

    copy = tensor.detach().clone()
    if copy.is_floating_point() and copy.dtype != torch.bfloat16:
        compact = copy.to(torch.bfloat16)
        if torch.equal(compact.to(copy.dtype), copy):
            return compact
    return copy
