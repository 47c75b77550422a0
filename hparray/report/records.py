"""The report's rows: every task once per search that holds it (un-fine-tuned rows once, under
`baseline_inference`), as the store's `report_rows` hands them out."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from hparray.store import Store
from hparray.store.records import ReportRow
from hparray.store.retry import retried_counts

BASELINE_INFERENCE = "baseline_inference"


@dataclass(frozen=True)
class TaskRow(ReportRow):
    """One task as a member of one search (the baseline config's rows appear once per search):
    the store's row with its search, name and value always set."""

    search: str
    name: str
    parameter: str
    value: float
    is_baseline: bool
    blocked: bool = False  # pending behind a baseline row that failed or diverged: it will not run unless retried
    retried: int = 0  # times `hparray retry` put it back (its earlier attempts stay in the attempts table)

    @property
    def config(self) -> str:
        return self.name

    def score(self, metric: str) -> float | None:
        """The metric if this row was scored (status done), else None."""
        value = getattr(self, metric)
        return float(value) if self.status == "done" and value is not None else None

    def trivial(self, metric: str) -> float | None:
        value = getattr(self, f"trivial_{metric}")
        return float(value) if self.status == "done" and value is not None else None

    def frames(self, metric: str, trivial: bool = False) -> dict[int, float]:
        """{frame index: the metric of that frame} of a scored row (the trivial predictor's with
        `trivial`), from `first_frame` = condition_frames on; empty for rows recorded without them."""
        if self.status != "done" or not self.per_frame:
            return {}
        stored = json.loads(self.per_frame)
        values = stored.get(f"trivial_{metric}" if trivial else metric) or []
        return {int(stored["first_frame"]) + i: float(v) for i, v in enumerate(values)}



def load_rows(store: Store) -> list[TaskRow]:
    """Every task once per search holding it; un-fine-tuned rows under 'baseline_inference'."""
    rows = []
    retried = retried_counts(store)
    for r in store.report_rows():
        if r.kind == "baseline":
            search, name, parameter, value, is_baseline = (
                BASELINE_INFERENCE, f"no_finetune_cf_{r.condition_frames}", "condition_frames",
                float(r.condition_frames), False)
        elif r.search is None:
            continue  # a fine-tune config no search holds (never planned that way): nothing to compare
        else:
            search, name, parameter = r.search, r.name or "", r.parameter or ""
            value, is_baseline = float(r.value or 0.0), bool(r.is_baseline)
        fields = {**asdict(r), "search": search, "name": name, "parameter": parameter, "value": value,
                  "is_baseline": is_baseline, "condition_frames": int(r.condition_frames)}
        rows.append(TaskRow(**fields, blocked=r.status == "pending" and r.depends_status in ("failed", "diverged"),
                            retried=retried.get(r.task_id, 0)))
    rows.sort(key=lambda row: (row.search == BASELINE_INFERENCE, row.search, row.value, row.video, row.task_id))
    return rows


def scores(rows: list[TaskRow], metric: str) -> dict[str, float]:
    """The scored rows' metric by video."""
    return {row.video: s for row in rows if (s := row.score(metric)) is not None}


def window_scores(rows: list[TaskRow], metric: str, first: int, last: int) -> dict[str, float]:
    """The scored rows' mean metric over frames first..last (inclusive) by video: the same frames
    for every config; rows without per-frame scores, or missing a frame, are left out."""
    found = {}
    for row in rows:
        frames = row.frames(metric)
        window = [frames[i] for i in range(first, last + 1) if i in frames]
        if window and len(window) == last - first + 1:
            found[row.video] = float(np.mean(window))
    return found
