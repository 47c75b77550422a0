"""Planned work for the seed grid (configs/*.yaml): hparray's deduplicated plan vs the naive one.

The naive per-video script runs every (search point, video) as its own fine-tune and, for the
comparison, its own un-fine-tuned inference: 15 points x 20 videos = 300 fine-tunes + 300
inferences. hparray plans the baseline point shared by the three searches once (13 distinct
fine-tune configs) and one un-fine-tuned inference per (video, condition_frames). GPU time uses
the estimates in configs/base.yaml (tasks.gpu_minutes_per_task, tasks.baseline_gpu_minutes).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import REPO, console, load_line, machine, table, write_json
from hparray.config import SweepConfig, load_sweep
from hparray.plan import build_plan, select_videos


@dataclass
class PlanRow:
    plan: str
    finetune_runs: int
    inference_runs: int
    total_runs: int
    gpu_hours: float


def naive_plan(sweep: SweepConfig, num_videos: int) -> PlanRow:
    """Every search point on every video: one fine-tune and one baseline inference each."""
    settings = sweep.settings
    points = sum(len(search.values) for search in sweep.select("all"))
    runs = points * num_videos
    minutes = runs * settings.tasks.gpu_minutes_per_task + runs * settings.tasks.baseline_gpu_minutes
    return PlanRow("naive (per video, own baseline)", runs, runs, 2 * runs, minutes / 60.0)


def hparray_plan(sweep: SweepConfig) -> PlanRow:
    plan = build_plan(sweep, "all", select_videos(sweep.settings))
    kinds = Counter(task.kind for task in plan.tasks)
    return PlanRow("hparray (deduplicated)", kinds["finetune"], kinds["baseline"], len(plan.tasks), plan.gpu_hours())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=REPO / "configs")
    args = parser.parse_args(argv)
    info = machine()
    sweep = load_sweep(args.config_dir)
    ours = hparray_plan(sweep)
    naive = naive_plan(sweep, sweep.settings.data.num_videos)
    tasks = sweep.settings.tasks
    caption = (f"{len(sweep.select('all'))} searches, {sweep.settings.data.num_videos} videos; "
               f"{tasks.gpu_minutes_per_task:g} GPU-min per fine-tune, {tasks.baseline_gpu_minutes:g} GPU-min "
               f"per baseline inference (configs/base.yaml)")
    console.print(table("Planned work for the seed grid", ["plan", "fine-tunes", "inferences", "runs", "GPU-hours"],
                        [[r.plan, r.finetune_runs, r.inference_runs, r.total_runs, f"{r.gpu_hours:.1f}"]
                         for r in (naive, ours)], caption=caption))
    ratios = {"runs": naive.total_runs / ours.total_runs, "gpu_hours": naive.gpu_hours / ours.gpu_hours,
              "gpu_hours_saved": naive.gpu_hours - ours.gpu_hours}
    console.print(f"naive / hparray: {ratios['runs']:.2f}x the runs, {ratios['gpu_hours']:.2f}x the GPU-hours "
                  f"({ratios['gpu_hours_saved']:.1f} GPU-hours saved)")
    console.print(load_line(info))
    path = write_json("plan", info, [asdict(naive), asdict(ours)], ratios=ratios)
    console.print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
