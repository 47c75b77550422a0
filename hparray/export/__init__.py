"""`hparray export`: the report's numbers in an experiment tracker (MLflow, TensorBoard, W&B offline).

What goes out is built here once, from `Report.summary_json()`, so every number a tracker shows
is the one summary.json holds; nothing is recomputed. One tracker run per distinct config: the
baseline point that the searches share is one run, named by its names joined with `=` (as `plan`
shows it, e.g. `lr_1e-5=steps_2`), and the un-fine-tuned inference of each condition_frames is a
run of kind `no_finetune`. A run is keyed by its config hash, so exporting again updates the same run.

Per run:
- hyperparameters: lr (fine-tune runs only), condition_frames, finetune_steps (0 without
  fine-tuning), kind (`finetune`, or `no_finetune` for the un-fine-tuned inference, which the
  store and per_video.csv call `baseline`: not to be read as the baseline config);
- searches, their names there, whether it is the baseline config, status (completed,
  in_progress, pending), and the verdict where it is a search's best value;
- metrics under summary.json's names, `/`-separated: `psnr/mean`, `psnr/ci_low`, ...,
  `vs_baseline/psnr/mean_diff`, `vs_baseline/psnr/p_holm`, `vs_no_finetune/...`, `vs_trivial/...`,
  `trivial/...` (inference runs), `rows/done`, `gpu_hours`; a number summary.json leaves null is
  left out. A config in several searches takes its numbers from its first search (`primary`;
  only the Holm adjustments differ between searches) and carries every search's entry in its
  summary.json artifact;
- per_video.csv: per_video.csv's rows of this config (its primary search).

The tracker clients are optional extras, imported by their writer only (`require`).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from hparray.config import Settings
from hparray.errors import BadInput, MissingExtra
from hparray.report import per_video_csv
from hparray.report.compute import compute
from hparray.report.records import BASELINE_INFERENCE, TaskRow
from hparray.store import Store

NAME_JOINER = "="
ESTIMATE_STATS = ("n", "mean", "std", "ci_low", "ci_high")
COMPARISON_STATS = ("pairs", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "improved", "worse", "ties")
REFERENCES = ("vs_baseline", "vs_no_finetune", "vs_trivial")
# The columns of a comparison view (TensorBoard's HParams): per metric, a few of the many numbers.
TRACKERS = {"mlflow": "MLflow", "tensorboard": "TensorBoard", "wandb": "W&B"}  # extra -> the tracker's name
HEADLINE = ("{m}/mean", "{m}/ci_low", "{m}/ci_high", "vs_baseline/{m}/mean_diff", "vs_baseline/{m}/p_holm")


@dataclass(frozen=True)
class ExportRun:
    """One config as a tracker run."""

    key: str  # the config hash: what finds the run again
    name: str
    names: dict[str, str]  # search -> the config's name there ('baseline_inference' for un-fine-tuned runs)
    primary: str  # the search whose summary.json entry the metrics come from
    kind: str  # finetune | no_finetune (the un-fine-tuned inference)
    baseline: bool  # the baseline config of its searches
    status: str  # completed | in_progress | pending (| stopped, by sequential stopping)
    partial: bool  # rows still to run (summary.json's `partial` of the config)
    hyperparameters: dict[str, float | int | str]
    metrics: dict[str, float]
    verdicts: dict[str, str]  # "<search>.<metric>" -> significant | not significant | baseline, where it is the best
    statements: list[str]
    per_video_csv: str
    summary: dict[str, Any]  # search -> this config's entry in summary.json

    @property
    def searches(self) -> list[str]:
        return list(self.names)

    def tags(self) -> dict[str, str]:
        """What a tracker can filter on, as strings."""
        tags = {"config_hash": self.key, "search": ",".join(self.searches), "baseline": str(self.baseline).lower(),
                "kind": self.kind, "status": self.status, "partial": str(self.partial).lower(),
                "primary_search": self.primary}
        tags.update({f"search.{search}": name for search, name in self.names.items()})
        tags.update({f"best.{where}": verdict for where, verdict in self.verdicts.items()})
        return tags

    def description(self) -> str:
        head = (f"hparray config {self.name} ({self.kind}, {self.status}) of search(es) {', '.join(self.searches)}"
                f"{', the baseline config' if self.baseline else ''}; hash {self.key}")
        return "\n".join([head, *self.statements])


@dataclass(frozen=True)
class Export:
    """Everything an export sends: the runs, and what they belong to."""

    experiment: str
    generated_at: float
    database: str
    partial: bool
    metrics: tuple[str, ...]  # the metrics the sweep measured
    runs: list[ExportRun]
    pending_rows: int = 0

    def headline(self) -> list[str]:
        """The metrics a comparison view shows, those some run has."""
        present = {key for run in self.runs for key in run.metrics}
        return [key for m in self.metrics for pattern in HEADLINE if (key := pattern.format(m=m)) in present]


@dataclass
class Written:
    """What one export did, for the CLI to print."""

    tracker: str
    where: str
    created: int = 0
    updated: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return self.created + self.updated


def require(extra: str) -> ModuleType:
    """Import a tracker's client (`mlflow`, `tensorboard`, `wandb`: extra and module have the same
    name), or say in one line which extra brings it."""
    try:
        return importlib.import_module(extra)
    except ImportError as err:
        raise MissingExtra(f"{TRACKERS[extra]} export needs the {extra} extra: pip install 'hparray[{extra}]' "
                           f"(import {extra}: {err})") from None


def sweep_name(settings: Settings) -> str:
    """The default experiment (and W&B project) name: the project folder's, the one holding configs/."""
    return settings.config_dir.resolve().parent.name or "hparray"


def collect(store: Store, experiment: str, now: float | None = None) -> Export:
    """The report's numbers (hparray.report.compute), one run per distinct config."""
    report, rows = compute(store, now)
    summary = report.summary_json()
    groups = [(name, search["configs"]) for name, search in summary["searches"].items()]
    groups.append((BASELINE_INFERENCE, summary[BASELINE_INFERENCE]))
    members: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for search, configs in groups:
        for entry in configs.values():
            members.setdefault(entry["hash"], []).append((search, entry))
    by_hash: dict[str, list[TaskRow]] = {}
    for row in rows:
        by_hash.setdefault(row.config_hash, []).append(row)
    runs = [_run(key, entries, by_hash[key], summary) for key, entries in members.items()]
    if not runs:
        raise BadInput(f"nothing to export: {report.database} holds no planned rows; run `hparray plan --search lr` "
                       "first, or pass --db")
    return Export(experiment=experiment, generated_at=report.generated_at, database=report.database,
                  partial=report.partial, metrics=tuple(report.metrics), runs=runs,
                  pending_rows=report.rows.get("pending", 0) + report.rows.get("running", 0))


def _run(key: str, entries: list[tuple[str, dict[str, Any]]], rows: list[TaskRow], summary: dict[str, Any]
         ) -> ExportRun:
    primary, entry = entries[0]
    first = rows[0]
    kind = "finetune" if first.kind == "finetune" else "no_finetune"
    hyperparameters: dict[str, float | int | str] = {}
    if kind == "finetune" and first.lr is not None:
        hyperparameters["lr"] = float(first.lr)
    hyperparameters.update(condition_frames=int(first.condition_frames),
                           finetune_steps=int(first.finetune_steps or 0), kind=kind)
    names = {search: e["name"] for search, e in entries}
    verdicts: dict[str, str] = {}
    statements = [f"stopped: {entry['stopped']}"] if entry.get("stopped") else []
    for search, name in names.items():
        for metric, best in summary["searches"].get(search, {}).get("best", {}).items():
            if best["config"] == name:
                verdicts[f"{search}.{metric}"] = ("baseline" if best["is_baseline"] else
                                                  "significant" if best["significant"] else "not significant")
                statements.append(f"{search}: {best['statement']}")
    return ExportRun(
        key=key, name=NAME_JOINER.join(names.values()), names=names, primary=primary, kind=kind,
        baseline=any(e["is_baseline"] for _, e in entries), status=entry["status"], partial=bool(entry["partial"]),
        hyperparameters=hyperparameters, metrics=flat_metrics(entry, summary["metrics"]), verdicts=verdicts,
        statements=statements, per_video_csv=per_video_csv([r for r in rows if r.search == primary]),
        summary={search: e for search, e in entries},
    )


def flat_metrics(entry: dict[str, Any], metrics: list[str]) -> dict[str, float]:
    """One config's summary.json entry as `/`-separated names -> numbers (nulls left out)."""
    flat: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            flat[name] = float(value)

    for metric in metrics:
        for stat in ESTIMATE_STATS:
            put(f"{metric}/{stat}", entry["metrics"][metric][stat])
        for reference in REFERENCES:
            comparison = entry[reference].get(metric)
            for stat in COMPARISON_STATS if comparison else ():
                put(f"{reference}/{metric}/{stat}", comparison[stat])
        trivial = entry["trivial"].get(metric)
        for stat in ESTIMATE_STATS if trivial else ():
            put(f"trivial/{metric}/{stat}", trivial[stat])
    for status, count in entry["rows"].items():
        put(f"rows/{status}", count)
    for name in ("videos_completed", "gpu_hours", "finetune_s_mean", "inference_s_mean"):
        put(name, entry[name])
    return flat
