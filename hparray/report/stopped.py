"""The report's view of sequential stopping (hparray.stopping): which configs stopped, after how many
videos and why, and the GPU-hours their skipped rows did not spend. A stopped config's estimates,
comparisons and verdicts are computed on the videos it has, like any other config's."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hparray.metrics import METRIC_LABELS
from hparray.report.format import fmt_p
from hparray.report.records import TaskRow
from hparray.store.records import StopRecord


@dataclass
class StoppedConfig:
    """One stopped config: the decision that stopped it and what its skipped rows would have cost."""

    hash: str
    search: str
    baseline: str
    metric: str
    videos: int
    planned: int
    looks: int
    p_value: float | None
    window_p_value: float | None
    boundary: float | None
    skipped: int
    gpu_hours_saved: float
    statement: str


@dataclass
class StoppingReport:
    """Every skipped row's estimated GPU time: the mean measured wall time of the done rows of its
    kind where there are any, else its planned estimate (`basis` says which)."""

    skipped_rows: int
    gpu_hours_saved: float
    basis: str
    configs: dict[str, StoppedConfig] = field(default_factory=dict)  # config hash -> its stop


def stopping_report(rows: list[TaskRow], records: list[StopRecord]) -> StoppingReport | None:
    """None when no row is skipped."""
    tasks = {row.task_id: row for row in rows}
    skipped = [row for row in tasks.values() if row.status == "skipped"]
    if not skipped:
        return None
    measured = {kind: float(np.mean(walls)) for kind in {row.kind for row in skipped}
                if (walls := [r.wall_s for r in tasks.values() if r.kind == kind and r.status == "done"
                              and r.wall_s is not None])}
    kinds = sorted(measured)
    basis = (f"the mean measured wall time of the done {'/'.join(kinds)} rows" if kinds
             else "the planned estimate (no row of that kind measured yet)")

    def cost_s(row: TaskRow) -> float:
        return measured.get(row.kind, row.estimate_s)

    by_record = {record.config_hash: record for record in records}
    baselines = {row.search: row.name for row in rows if row.is_baseline}
    configs: dict[str, StoppedConfig] = {}
    for config in sorted({row.config_hash for row in skipped}):
        mine = [row for row in skipped if row.config_hash == config]
        hours = sum(cost_s(row) for row in mine) / 3600.0
        record = by_record.get(config)
        search = record.search if record else mine[0].search
        baseline = baselines.get(search, "the baseline")
        if record is None:
            statement = f"stopped: {len(mine)} rows skipped (no decision recorded), ~{hours:.2f} GPU-hours saved"
        else:
            window = ("" if record.window_p_value is None else
                      f" (on the common window of frames p={fmt_p(record.window_p_value)})")
            label = METRIC_LABELS.get(record.metric, record.metric)
            statement = (f"stopped after {record.videos} of {record.planned} videos: worse than {baseline} on "
                         f"{label}, one-sided Wilcoxon p={record.p_value:.4f} < {record.boundary:.4f} "
                         f"(Bonferroni over {record.looks} planned looks)"
                         f"{window}; {len(mine)} rows skipped, ~{hours:.2f} GPU-hours saved")
        configs[config] = StoppedConfig(
            hash=config, search=search, baseline=baseline, metric=record.metric if record else "",
            videos=record.videos if record else 0, planned=record.planned if record else 0,
            looks=record.looks if record else 0, p_value=record.p_value if record else None,
            window_p_value=record.window_p_value if record else None,
            boundary=record.boundary if record else None, skipped=len(mine), gpu_hours_saved=hours,
            statement=statement)
    return StoppingReport(skipped_rows=len(skipped), gpu_hours_saved=sum(cost_s(r) for r in skipped) / 3600.0,
                          basis=basis, configs=configs)
