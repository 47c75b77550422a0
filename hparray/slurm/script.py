"""The job-array script: `sbatch/worker.sbatch.j2` rendered from the `slurm:` settings.

Each setting that becomes an `#SBATCH` line says so once, where it is declared
(`config.SlurmSettings`, its `sbatch` metadata); this module turns those declarations into
lines, adds what hparray sets itself (the array, the signal, the log paths) and renders the
template through the package's one jinja2 environment.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from hparray.config import Settings, SlurmSettings
from hparray.errors import BadInput
from hparray.fields import TIME_PATTERN

TEMPLATE = "worker.sbatch.j2"


class SlurmOptionError(BadInput):
    """A Slurm option given on the command line or in base.yaml cannot be used."""


@dataclass(frozen=True)
class Overrides:
    """Command-line changes to base.yaml's `slurm:` section, for one submission."""

    partition: str | None = None
    time: str | None = None
    gpus: int | None = None
    sbatch_args: tuple[str, ...] = ()


def normalise_directive(arg: str, where: str) -> str:
    """`--mail-type=END`, `mail-type=END` or `#SBATCH --mail-type=END` -> `--mail-type=END`."""
    text = arg.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if not text or "\n" in text:
        raise SlurmOptionError(f"{where} {arg!r} is not one sbatch option: write it like --mail-type=END")
    if not text.startswith("-"):
        text = "--" + text
    name = text.split("=", 1)[0].split()[0]
    if name in ("--array", "-a"):
        raise SlurmOptionError(f"{where} {arg!r}: hparray sets --array itself: use --workers and --throttle")
    return text


def _path_value(path: Path, where: str, pattern: bool = False) -> str:
    """A path inside a double-quoted #SBATCH value: sbatch reads `\"` as a quote inside it; a
    backslash escapes anything, so a path holding one cannot be written; in --output/--error a `%`
    starts a filename pattern, so it is doubled."""
    text = str(path)
    if "\\" in text or "\n" in text:
        raise SlurmOptionError(f"{where} {text!r} holds a backslash or a newline, which sbatch cannot read in a "
                               "directive: move the project to a path without them")
    text = text.replace('"', '\\"')
    return text.replace("%", "%%") if pattern else text


def _plain(value: str | None, where: str) -> str | None:
    """A directive value: sbatch reads `#SBATCH` lines word by word, so no whitespace."""
    if value is not None and (not value.strip() or re.search(r"\s", value)):
        raise SlurmOptionError(f"{where} {value!r} contains whitespace: sbatch directives cannot hold it; "
                               "choose a value without spaces")
    return value


# The command-line flags that override a resource setting, for the messages.
_OVERRIDE_FLAGS = {"partition": "--partition", "time": "--time", "gpus_per_task": "--gpus"}
# One jinja2 environment for the package's templates (sbatch/, shipped as hparray.sbatch).
ENVIRONMENT = jinja2.Environment(loader=jinja2.PackageLoader("hparray.sbatch", "."), undefined=jinja2.StrictUndefined,
                                 trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def render_script(settings: SlurmSettings, *, array_size: int, throttle: int, worker_command: list[str],
                  workdir: Path, overrides: Overrides = Overrides()) -> str:
    """The batch script of one worker array: sbatch/worker.sbatch.j2 filled in (pure: no I/O but the template).

    The resource lines come from `SlurmSettings.directives()` (each declared once, with its
    setting); a relative `slurm.log_dir` is relative to `workdir`, the folder the workers run in.
    """
    if array_size < 1 or throttle < 1:
        raise SlurmOptionError(f"array of {array_size} workers, {throttle} at once: both must be at least 1")
    time_limit = overrides.time or settings.time
    if not TIME_PATTERN.fullmatch(time_limit):
        raise SlurmOptionError(f"--time {time_limit!r} is not a Slurm time: write MM, HH:MM:SS or D-HH:MM:SS")
    if overrides.gpus is not None and overrides.gpus < 0:
        raise SlurmOptionError(f"--gpus {overrides.gpus}: use 0 (no GPU) or more")
    changed = {"partition": overrides.partition, "time": overrides.time, "gpus_per_task": overrides.gpus}
    effective = settings.model_copy(update={k: v for k, v in changed.items() if v is not None})
    resources = []
    for name, flag, value in effective.directives():
        where = _OVERRIDE_FLAGS[name] if changed.get(name) is not None else f"slurm.{name}"
        resources.append(flag.format(_plain(value, where) if isinstance(value, str) else value))
    log_dir = Path(settings.log_dir)
    log_dir = log_dir if log_dir.is_absolute() else Path(workdir) / log_dir
    extra = [normalise_directive(arg, "slurm.extra_directives") for arg in settings.extra_directives]
    extra += [normalise_directive(arg, "--sbatch-arg") for arg in overrides.sbatch_args]
    return ENVIRONMENT.get_template(TEMPLATE).render(
        resources=resources,
        workdir=_path_value(Path(workdir), "the project folder"),
        array_size=array_size,
        throttle=min(throttle, array_size),
        signal_grace_s=settings.signal_grace_s,
        log_dir=_path_value(log_dir, "slurm.log_dir", pattern=True),
        extra_directives=extra,
        setup=list(settings.setup),
        worker_command=shlex.join(worker_command),
    )


def log_dir_of(settings: Settings) -> Path:
    """Where the array tasks' logs go: slurm.log_dir, relative to the project folder."""
    path = Path(settings.slurm.log_dir)
    return path if path.is_absolute() else settings.config_dir.parent / path

