"""Weights & Biases, offline: one offline run per config under DIR/wandb/, for `wandb sync` to
upload from a machine that can reach the server.

The run id is derived from the experiment name and the config hash, so a second export (and its
sync) resumes the same run instead of adding one; the offline folder an earlier export left for
that id is replaced, since the new one holds the whole run. Config: the hyperparameters, the
searches, baseline and hash; summary: the report's numbers; tags: `search:<name>`, `baseline`
(the baseline config), `kind:<kind>`; files: per_video.csv and the config's summary.json entries.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from hparray.errors import ExportError
from hparray.export import Export, ExportRun, Written, require


def run_id(experiment: str, key: str) -> str:
    """The same W&B run id for the same config of the same experiment, every export."""
    return hashlib.sha256(f"{experiment}\0{key}".encode()).hexdigest()[:16]


def export_wandb(export: Export, directory: Path, project: str | None = None) -> Written:
    wandb = require("wandb")
    offline = directory / "wandb"
    written = Written("W&B", f"offline runs of project {project or export.experiment!r} under {offline}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for run in export.runs:
            identity = run_id(export.experiment, run.key)
            previous = sorted(offline.glob(f"offline-run-*-{identity}"))
            for folder in previous:
                shutil.rmtree(folder)
            written.updated += bool(previous)
            written.created += not previous
            _write(wandb, run, identity, export, directory, project or export.experiment)
    except OSError as err:
        raise ExportError(f"cannot write W&B runs under {directory} ({err.strerror or err}): fix its permissions "
                          "or free space, or export elsewhere with --dir DIR") from err
    finally:
        wandb.teardown()
    written.notes.append(f"upload from a machine that reaches W&B: wandb sync {offline}/offline-run-*")
    return written


def _write(wandb: Any, run: ExportRun, identity: str, export: Export, directory: Path, project: str) -> None:
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True,
                              x_save_requirements=False, disable_git=True, save_code=False,
                              disable_job_creation=True)
    config = {**run.hyperparameters, "searches": run.searches, "names": run.names, "baseline": run.baseline,
              "config_hash": run.key, "status": run.status, "verdicts": run.verdicts}
    tags = [f"search:{search}" for search in run.searches] + [f"kind:{run.kind}"]
    if run.baseline:
        tags.append("baseline")
    try:
        handle = wandb.init(project=project, group=export.experiment, id=identity, name=run.name, dir=str(directory),
                            mode="offline", resume="allow", job_type="hparray-export", config=config, tags=tags,
                            notes=run.description(), settings=settings)
    except Exception as err:  # wandb raises many types of its own
        raise ExportError(f"W&B could not start an offline run under {directory}: {err}") from err
    failed = True
    try:
        handle.summary.update(run.metrics)
        files = Path(handle.dir)
        (files / "per_video.csv").write_text(run.per_video_csv)
        (files / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
        failed = False
    finally:
        handle.finish(exit_code=1 if failed else 0)
