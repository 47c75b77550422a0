"""TensorBoard: the HParams dashboard (its table and parallel-coordinates view compare configs)
and every number as a scalar, written with tensorboard's own protos, no TensorFlow.

LOGDIR/<run name>/ per config holds one event file: the config's hyperparameters (a session
start) and its metrics (float32 scalars at step 0), plus `hparray_run.json`, which names the config
hash so a run whose name changed (a search was added to the shared baseline) is still found.
LOGDIR itself holds the experiment's HParams config: every hyperparameter's domain and the headline
metrics as the dashboard's columns. Exporting again replaces each run's event files instead of
adding to them, so TensorBoard never sees a run twice.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from hparray.errors import ExportError
from hparray.export import Export, ExportRun, Written, require

MARKER = "hparray_run.json"
EVENTS = "events.out.tfevents.*"
UNSAFE = re.compile(r"[^\w.+=-]")


def export_tensorboard(export: Export, logdir: Path) -> Written:
    require("tensorboard")
    written = Written("TensorBoard", str(logdir))
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        known = _known_runs(logdir)
        _rewrite(logdir, [_experiment_summary(export)], export.generated_at)
        for run in export.runs:
            folder = logdir / UNSAFE.sub("_", run.name)
            previous = known.get(run.key)
            if previous is not None and previous != folder:
                shutil.rmtree(previous)  # the same config under its old name
            written.updated += previous is not None
            written.created += previous is None
            folder.mkdir(exist_ok=True)
            _rewrite(folder, [_session_start(run, export), _scalars(run)], export.generated_at)
            (folder / MARKER).write_text(json.dumps({"config_hash": run.key, "name": run.name}) + "\n")
    except OSError as err:
        raise ExportError(f"cannot write TensorBoard events under {logdir} ({err.strerror or err}): fix its "
                          "permissions or free space, or export elsewhere with --logdir DIR") from err
    return written


def _known_runs(logdir: Path) -> dict[str, Path]:
    """config hash -> the run folder an earlier export wrote for it."""
    found = {}
    for marker in sorted(logdir.glob(f"*/{MARKER}")):
        try:
            found[json.loads(marker.read_text())["config_hash"]] = marker.parent
        except (ValueError, KeyError):
            continue  # not ours
    return found


def _rewrite(folder: Path, summaries: list[Any], wall_time: float) -> None:
    """Replace the folder's event files with one holding these summaries."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    for old in folder.glob(EVENTS):
        if old.is_file():
            old.unlink()
    writer = EventFileWriter(str(folder))
    try:
        for summary in summaries:
            writer.add_event(Event(wall_time=wall_time, step=0, summary=summary))
    finally:
        writer.close()


def _hparams(run: ExportRun) -> dict[str, float | int | str | bool]:
    return {**run.hyperparameters, "search": ",".join(run.searches), "baseline": run.baseline}


def _experiment_summary(export: Export) -> Any:
    from tensorboard.plugins.hparams import summary_v2 as hp

    values: dict[str, set[Any]] = {}
    for run in export.runs:
        for name, value in _hparams(run).items():
            values.setdefault(name, set()).add(value)
    domains = []
    for name, seen in values.items():
        if name == "lr":
            domains.append(hp.HParam(name, hp.RealInterval(float(min(seen)), float(max(seen)))))
        elif all(isinstance(v, bool) for v in seen):
            domains.append(hp.HParam(name, hp.Discrete(sorted(seen))))
        elif all(isinstance(v, (int, float)) for v in seen):
            domains.append(hp.HParam(name, hp.Discrete(sorted(float(v) for v in seen))))
        else:
            domains.append(hp.HParam(name, hp.Discrete(sorted(str(v) for v in seen))))
    metrics = [hp.Metric(tag, display_name=tag) for tag in export.headline()]
    return hp.hparams_config_pb(hparams=domains, metrics=metrics, time_created_secs=export.generated_at)


def _session_start(run: ExportRun, export: Export) -> Any:
    from tensorboard.plugins.hparams import summary_v2 as hp

    hparams = {name: float(value) if isinstance(value, int) and not isinstance(value, bool) else value
               for name, value in _hparams(run).items()}
    return hp.hparams_pb(hparams, trial_id=run.name, start_time_secs=export.generated_at)


def _scalars(run: ExportRun) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=name, simple_value=value) for name, value in run.metrics.items()])
