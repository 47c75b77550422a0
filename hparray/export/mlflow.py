"""MLflow: one run per config in an experiment named after the sweep, found again by its
`hparray.config_hash` tag, so a second export updates the runs the first one created.

Works against a local file store (a folder, or a file: URI; MLflow 3 wants
MLFLOW_ALLOW_FILE_STORE=true for it, set here unless the caller set it) or any tracking URI
(http(s):// with 2 retries and a 30 s timeout unless MLFLOW_HTTP_REQUEST_* say otherwise,
sqlite:///, databricks). Params are the hyperparameters, metrics the report's numbers
(step 0, stamped with the report's time: the newest export is a metric's latest value), tags the
searches, the baseline and the verdicts, the description the verdicts' sentences; artifacts:
per_video.csv and the config's summary.json entries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hparray.errors import ExportError
from hparray.export import Export, ExportRun, Written, require

TAG_PREFIX = "hparray."
HASH_TAG = TAG_PREFIX + "config_hash"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri(uri: str | Path) -> str:
    """A folder becomes a file: URI; anything with a scheme is passed on."""
    text = str(uri)
    if len(urlparse(text).scheme) > 1 or text == "databricks":
        return text
    return Path(text).expanduser().resolve().as_uri()


def export_mlflow(export: Export, uri: str | Path) -> Written:
    require("mlflow")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    target = tracking_uri(uri)
    written = Written("MLflow", f"experiment {export.experiment!r} at {target}")
    try:
        scheme = urlparse(target).scheme
        if scheme == "file":
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            Path(urlparse(target).path).mkdir(parents=True, exist_ok=True)
        elif scheme in ("http", "https"):
            # MLflow's defaults retry an unreachable server for minutes: fail within seconds instead.
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        client = MlflowClient(tracking_uri=target)
        experiment_id = _experiment(client, export.experiment)
        existing = _existing_runs(client, experiment_id)
        for run in export.runs:
            run_id = existing.get(run.key)
            if run_id is None:
                run_id = client.create_run(experiment_id, start_time=_ms(export.generated_at),
                                           tags={HASH_TAG: run.key}, run_name=run.name).info.run_id
                written.created += 1
            else:
                written.updated += 1
            _log(client, run_id, run, export)
    except MlflowException as err:
        raise ExportError(f"MLflow at {target}: {err.message}") from err
    except OSError as err:
        raise ExportError(f"cannot write the MLflow store at {target} ({err.strerror or err}): fix its permissions "
                          "or free space, or export elsewhere with --uri URI") from err
    return written


def _experiment(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        return str(client.create_experiment(name, tags={TAG_PREFIX + "exported_by": "hparray export"}))
    if found.lifecycle_stage == "deleted":
        raise ExportError(f"MLflow experiment {name!r} was deleted: restore it (mlflow experiments restore "
                          f"--experiment-id {found.experiment_id}) or export to another with --experiment NAME")
    return str(found.experiment_id)


def _existing_runs(client: Any, experiment_id: str) -> dict[str, str]:
    """config hash -> the run carrying it (the oldest, should an interrupted export have made two)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    found: dict[str, str] = {}
    for run in runs:
        key = run.data.tags.get(HASH_TAG)
        if key:
            found.setdefault(key, run.info.run_id)
    return found


def _log(client: Any, run_id: str, run: ExportRun, export: Export) -> None:
    from mlflow.entities import Metric, Param, RunTag

    stamp = _ms(export.generated_at)
    metrics = [Metric(name, value, stamp, 0) for name, value in run.metrics.items()]
    params = [Param(name, _param(value)) for name, value in run.hyperparameters.items()]
    tags = [RunTag(TAG_PREFIX + name, value) for name, value in run.tags().items()]
    tags += [RunTag(TAG_PREFIX + "database", export.database), RunTag("mlflow.runName", run.name),
             RunTag("mlflow.note.content", run.description())]
    client.log_batch(run_id, metrics=metrics[:BATCH], params=params, tags=tags)
    for start in range(BATCH, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH])
    client.log_text(run_id, run.per_video_csv, "per_video.csv")
    client.log_text(run_id, json.dumps(run.summary, indent=2) + "\n", "summary.json")
    if run.partial:
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status="FINISHED")


def _param(value: float | int | str) -> str:
    """Params are strings; a float keeps every digit (1e-05, not 1e-5 rounded)."""
    return repr(value) if isinstance(value, float) else str(value)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
