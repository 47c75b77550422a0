"""Whether a sweep's rows fit the GPU they will run on, said before anything is queued.

The runner estimates a row's memory (`memory_estimate`, e.g. the `ltx` runner's
docs/memory.md); the GPU's size comes from `slurm.gpu_memory_gib` for Slurm jobs, or from the
GPUs this machine sees for local workers. A row is judged by the largest conditioning of the
rows still to run, since memory grows with the tokens fine-tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass

from hparray.config import Settings
from hparray.environment import visible_gpu_memory_gib
from hparray.errors import BadInput
from hparray.runners.protocol import MemoryEstimate, memory_estimate

FIXES = ("model.finetune: lora", "model.gradient_checkpointing: true", "model.dtype: bfloat16",
         "a smaller data.height/width")


class DoesNotFit(BadInput):
    """A row's estimated GPU memory exceeds the GPU it would run on."""


@dataclass(frozen=True)
class MemoryFit:
    """A row's estimate against the GPU's size (None when nothing says how large the GPU is)."""

    estimate: MemoryEstimate
    kind: str
    condition_frames: int
    capacity_gib: float | None
    capacity_source: str

    @property
    def needed_gib(self) -> float:
        return self.estimate.peak_gib if self.kind == "finetune" else self.estimate.baseline_peak_gib

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_gib is None else self.needed_gib <= self.capacity_gib

    def line(self) -> str:
        """One line for `plan` and `doctor`."""
        row = f"a {'fine-tune' if self.kind == 'finetune' else 'baseline'} row at condition_frames " \
              f"{self.condition_frames}"
        head = f"about {self.needed_gib:.1f} GiB for {row} ({self.estimate.breakdown()} GiB, CUDA context included)"
        if self.capacity_gib is None:
            return f"{head}; set slurm.gpu_memory_gib so submit checks it against the GPU"
        verdict = "fits" if self.fits else "does NOT fit"
        return f"{head}; {verdict} the {self.capacity_gib:.3g} GiB GPU ({self.capacity_source})"


def memory_fit(settings: Settings, largest: dict[str, int], *, local: bool) -> MemoryFit | None:
    """The fit of the heaviest row still to run (`largest`: {kind: most conditioning frames}), or
    None when the runner makes no estimate or nothing is left to run."""
    kind = "finetune" if "finetune" in largest else "baseline" if "baseline" in largest else None
    if kind is None:
        return None
    estimate = memory_estimate(settings, largest[kind])
    if estimate is None:
        return None
    capacity, source = settings.slurm.gpu_memory_gib, "slurm.gpu_memory_gib"
    if local or capacity is None:
        visible = visible_gpu_memory_gib()
        if visible is not None and (local or capacity is None):
            capacity, source = visible, "the GPU this machine has"
    return MemoryFit(estimate, kind, largest[kind], capacity, source)


def refuse_if_too_large(fit: MemoryFit | None) -> None:
    """Raise DoesNotFit with the estimate and what would shrink it."""
    if fit is None or fit.fits is not False:
        return
    raise DoesNotFit(f"a row needs {fit.line()}: set {', or '.join(FIXES)} in configs/base.yaml, or run on a "
                     "larger GPU (the estimate is explained in docs/memory.md)")
