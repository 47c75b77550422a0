"""Checks before GPU time is spent: `hparray doctor` runs them all, `submit` the ones that would
otherwise fail on the first task, hours into a queue wait."""

from __future__ import annotations

import importlib.metadata
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hparray import slurm
from hparray.config import Settings
from hparray.environment import NETWORK_FILESYSTEMS
from hparray.errors import HparrayError
from hparray.gpu_memory import FIXES, memory_fit, refuse_if_too_large
from hparray.metrics import lpips_weights_status, require_lpips
from hparray.plan import model_description
from hparray.runners import check_runner
from hparray.store import Store

PACKAGES = ("scikit-image", "sqlalchemy", "click", "rich", "pydantic", "av")
# Optional, by extra: the built-in LTX-Video runner, LPIPS, and the trackers of `hparray export`.
EXTRAS = {"ltx": ("torch", "diffusers", "peft", "transformers"), "lpips": ("lpips", "torch", "torchvision"),
          "mlflow": ("mlflow-skinny",), "tensorboard": ("tensorboard",), "wandb": ("wandb",)}
# Bytes a row keeps per pixel of its video, by `artifacts:` setting (the mp4 preview included):
# float32 compresses barely (~0.95), FFV1 keeps uint8 RGB at ~0.6 of raw on noisy content.
ARTIFACT_BYTES_PER_PIXEL = {"full": 4 * 3 * 0.95, "lossless": 3 * 0.6, "preview": 0.1, "none": 0.0}


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table; `fix` says what to do when it is not ok."""

    name: str
    state: str  # ok | warn | fail
    detail: str
    fix: str = ""


def before_submit(settings: Settings, store: Store | None = None, *, local: bool = False) -> None:
    """Refuse to start a sweep that would fail on its first task: a runner that cannot start,
    LPIPS without its weights, rows that do not fit the GPU."""
    check_runner(settings)
    if "lpips" in settings.metrics:
        require_lpips()
    if store is not None:
        refuse_if_too_large(memory_fit(settings, store.largest_condition_frames(), local=local))


def run_checks(settings: Settings | None, store_url: str | None, slurm_wanted: bool = True) -> list[Check]:
    """Every check; none raises, each says what passed and what to fix."""
    checks = [_python(), *_packages(), _gpus()]
    if settings is not None:
        checks.append(_lpips(settings))
        checks.append(_model(settings))
        checks.extend(_memory(settings, store_url))
        checks.append(_disk(settings))
    checks.extend(_database(store_url))
    if slurm_wanted:
        checks.extend(_slurm(settings, store_url))
    return checks


def _python() -> Check:
    return Check("python", "ok", ".".join(map(str, sys.version_info[:3])))  # pip enforces requires-python


def _versions(names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    found, missing = [], []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return found, missing


def _packages() -> list[Check]:
    found, missing = _versions(PACKAGES)
    checks = [Check("packages", "fail", "missing: " + ", ".join(missing), "pip install hparray again")
              if missing else Check("packages", "ok", ", ".join(found))]
    for extra, names in EXTRAS.items():
        found, missing = _versions(names)
        checks.append(Check(f"extra [{extra}]", "warn", "not installed: " + ", ".join(missing),
                            f"pip install 'hparray[{extra}]' if you need it")
                      if missing else Check(f"extra [{extra}]", "ok", ", ".join(found)))
    return checks


def _gpus() -> Check:
    from hparray.environment import visible_gpus

    gpus = visible_gpus()
    if gpus:
        return Check("gpus", "ok", f"{len(gpus)} visible ({','.join(gpus)})")
    return Check("gpus", "warn", "none visible: tasks run on the CPU (fine for the built-in tiny model)",
                 "run on a GPU node, or check CUDA_VISIBLE_DEVICES / nvidia-smi")


def _lpips(settings: Settings) -> Check:
    status = lpips_weights_status()
    wanted = "lpips" in settings.metrics
    if not status.present:
        return Check("lpips weights", "fail" if wanted else "warn", f"{status.path} missing",
                     f"copy alexnet-owt-7be5be79.pth into {status.path.parent}/ or drop lpips from metrics")
    if not status.genuine:
        return Check("lpips weights", "fail" if wanted else "warn",
                     f"{status.path} is not genuine (sha256 {status.sha256_prefix}...)",
                     "replace it with the real torchvision AlexNet weights")
    return Check("lpips weights", "ok", f"{status.path} (sha256 {status.sha256_prefix}...)")


def _model(settings: Settings) -> Check:
    try:
        check_runner(settings)
    except HparrayError as err:
        return Check("runner", "fail", str(err), "fix runner or model in configs/base.yaml")
    return Check("runner", "ok", model_description(settings))


def _memory(settings: Settings, store_url: str | None) -> list[Check]:
    """The GPU memory of the heaviest row still to run (or of the baseline point, before a plan)."""
    largest = {"finetune": settings.baseline.condition_frames}
    try:
        store = Store.open(store_url, create=False)
        try:
            largest = store.largest_condition_frames() or largest
        finally:
            store.close()
    except HparrayError:
        pass  # no sweep yet
    try:
        fit = memory_fit(settings, largest, local=False)
    except HparrayError as err:
        return [Check("gpu memory", "warn", f"cannot estimate: {err}")]
    if fit is None:
        return []
    state = {True: "ok", False: "fail", None: "warn"}[fit.fits]
    fix = "" if fit.fits else "set slurm.gpu_memory_gib" if fit.fits is None else ", or ".join(FIXES)
    return [Check("gpu memory", state, fit.line(), fix)]


def _disk(settings: Settings) -> Check:
    out = settings.output_path()
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    per_task = (settings.data.num_frames * settings.data.height * settings.data.width
                * ARTIFACT_BYTES_PER_PIXEL[settings.artifacts])
    detail = (f"{free / 2**30:.1f} GiB free at {probe}; ~{per_task / 2**20:.1f} MiB of artifacts per task "
              f"(artifacts: {settings.artifacts})")
    if free < 400 * per_task:
        return Check("disk", "warn", detail, f"free space under {out} (a full grid of 360 rows needs "
                                             f"~{360 * per_task / 2**30:.1f} GiB)")
    return Check("disk", "ok", detail)


def _database(url: str | None) -> list[Check]:
    checks = []
    version = sqlite3.sqlite_version
    returning = sqlite3.sqlite_version_info >= (3, 35, 0)
    checks.append(Check("sqlite", "ok" if returning else "warn",
                        f"SQLite {version}" + ("" if returning else " (no RETURNING: the slower claim is used)"),
                        "" if returning else "a newer Python or pysqlite3 brings a newer SQLite"))
    try:
        store = Store.open(url, create=False)
    except HparrayError as err:
        checks.append(Check("database", "fail" if "no database" not in str(err) else "warn", str(err),
                            "run `hparray plan` first, or fix --db / HPARRAY_DB"))
        return checks
    try:
        detail = f"{store.url} ({store.dialect}, schema v{store.schema_version()})"
        checks.append(Check("database", "ok", detail))
        if store.dialect == "sqlite":
            network = store.filesystem in NETWORK_FILESYSTEMS
            checks.append(Check(
                "journal", "warn" if network else "ok",
                f"journal_mode {store.journal_mode} on {store.filesystem}",
                "many nodes on a network filesystem: consider PostgreSQL (--db postgresql://...)" if network else "",
            ))
    finally:
        store.close()
    return checks


def _slurm(settings: Settings | None, store_url: str | None = None) -> list[Check]:
    missing = [cmd for cmd in ("sbatch", "squeue", "scancel", "scontrol") if shutil.which(cmd) is None]
    if missing:
        return [Check("slurm", "warn", f"not found: {', '.join(missing)}",
                      "run on a Slurm login node, or use `hparray submit --local`")]
    checks = [Check("slurm", "ok", "sbatch, squeue, scancel, scontrol on PATH")]
    partition = settings.slurm.partition if settings is not None else None
    argv = ["sinfo", "-h", "-o", "%P %a"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        checks.append(Check("partition", "warn", f"sinfo failed: {err}", "check that slurmctld answers"))
        return checks
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        checks.append(Check("partition", "fail", f"{partition or 'default'}: not visible ({reason})",
                            "set slurm.partition in configs/base.yaml to one `sinfo` lists"))
    else:
        up = [line.split()[0] for line in lines if line.split()[-1] == "up"]
        checks.append(Check("partition", "ok" if up else "warn", ", ".join(lines[:3]),
                            "" if up else "the partition is not up"))
    if settings is not None:
        checks.extend(_array_task_fits(settings, store_url))
    return checks


def _array_task_fits(settings: Settings, store_url: str | None) -> list[Check]:
    """What submit refuses: an array task no node can run, a time limit shorter than one row."""
    checks = []
    try:
        fits = slurm.check_partition_fits(settings, slurm.Overrides())
        checks.append(Check("partition", "ok", f"an array task fits: {fits or 'sinfo cannot tell'}"))
    except HparrayError as err:
        checks.append(Check("partition", "fail", str(err), "fix the slurm section of configs/base.yaml"))
    store = None
    try:
        store = Store.open(store_url, create=False)
    except HparrayError:
        pass  # no sweep yet: judge by the configured estimate
    try:
        note = slurm.check_time_limit(settings, store, None)
        checks.append(Check("time limit", "warn" if note else "ok", note or f"slurm.time {settings.slurm.time}",
                            "raise slurm.time so a task runs several rows" if note else ""))
    except HparrayError as err:
        checks.append(Check("time limit", "fail", str(err), "raise slurm.time in configs/base.yaml"))
    finally:
        if store is not None:
            store.close()
    return checks
