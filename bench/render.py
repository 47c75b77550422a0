"""Markdown tables from bench/out/*.json, for docs/benchmarks.md: the figures there are pasted
from this output rather than copied by hand. `python -m bench.render [--out-dir bench/out]`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    before, after = m["load_before"], m.get("load_after", [float("nan")] * 3)
    return (f"_{m['date']}, {m['cpus']} cores, SQLite {m['sqlite']}, Python {m['python']}; load average "
            f"{before[0]:.1f} before, {after[0]:.1f} after (1 min)._")


def claims(data: dict[str, Any]) -> str:
    rows = [[r["backend"], r["procs"], r["tasks"], f"{r['tasks_per_s']:,.1f}", f"{r['p50_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['longest_wait_s']:.2f}", f"{r['workers_with_work']}/{r['procs']}",
             r["double_claims"], r["lost_finishes"]] for r in data["rows"]]
    table = md_table(["backend", "procs", "tasks", "tasks/s", "p50 claim ms", "p99 claim ms", "longest wait s",
                      "workers with work", "double claims", "refused finishes"], rows)
    checks = md_table(["acceptance check (this run)", "measured", "result"],
                      [[c["check"], c["value"], "PASS" if c["pass"] else "**FAIL**"] for c in data["acceptance"]])
    return "\n\n".join([machine_line(data), table, checks])


def overhead(data: dict[str, Any]) -> str:
    rows = [[r["task_id"], r["kind"], f"{r['wall_s']:.2f}", f"{r['claim_ms']:.1f}", f"{r['check_ms']:.1f}",
             f"{r['artifacts_ms']:.1f}", f"{r['finish_ms']:.1f}", f"{r['heartbeats']} ({r['heartbeat_ms']:.1f})",
             f"{r['overhead_ms']:.1f}", f"{r['share']:.2%}"] for r in data["rows"]]
    x = data["extrapolation"]
    table = md_table(["task", "kind", "wall s", "claim ms", "check ms", "artifacts ms", "finish ms",
                      "heartbeats (ms, beside)", "overhead ms", "share of wall"], rows)
    lines = [
        ["claim + plan check + finish", f"{x['claim_ms'] + x['check_ms'] + x['finish_ms']:.1f} ms", "once per task"],
        ["reaper pass", f"{x['reap_ms']:.1f} ms", "at most once per task"],
        ["artifacts (frames.npz + generated.mp4, 49x64x64)", f"{x['artifacts_ms']:.1f} ms", "once per task"],
        ["heartbeat: thread CPU (wall)", f"{x['heartbeat_cpu_ms']:.1f} ms ({x['heartbeat_ms']:.1f} ms)",
         f"{x['heartbeats_per_5min']:.0f} per 5 min, beside the task"],
        ["**total a 5-minute task is lengthened by**", f"**{x['total_5min_ms']:.0f} ms**",
         f"**{x['share_5min']:.3%}** of 300 s"],
        ["of which the store (claim, check, finish, reap, heartbeat CPU)",
         f"{x['store_share_5min'] * 300e3:.0f} ms", f"{x['store_share_5min']:.3%} of 300 s"],
        ["upper bound: heartbeats at their full wall time", f"{x['upper_5min_ms']:.0f} ms",
         f"{x['share_5min_upper']:.3%} of 300 s"],
    ]
    if x.get("artifacts_360p_s") is not None:
        lines.append(["with 49x360x640 artifacts instead",
                      f"{x['total_5min_ms'] - x['artifacts_ms'] + x['artifacts_360p_s'] * 1e3:.0f} ms",
                      f"{x['share_5min_360p']:.2%} of 300 s (artifacts {x['artifacts_360p_s'] * 1e3:.0f} ms, "
                      f"{x['artifacts_360p_bytes'] / 1e6:.0f} MB)"])
    caption = (f"SQLite {x['journal']} journal; fine-tune rows of {x['finetune_steps']} steps; model load "
               f"{x['model_load_s']:.1f} s once per worker, before its first claim.")
    return "\n\n".join([machine_line(data), table, caption,
                         md_table(["5-minute task", "time", "how often / share"], lines)])


def plan(data: dict[str, Any]) -> str:
    rows = [[r["plan"], r["finetune_runs"], r["inference_runs"], r["total_runs"], f"{r['gpu_hours']:.1f}"]
            for r in data["rows"]]
    r = data["ratios"]
    return "\n\n".join([md_table(["plan", "fine-tunes", "inferences", "runs", "GPU-hours"], rows),
                        f"naive / hparray: **{r['runs']:.2f}x** the runs, **{r['gpu_hours']:.2f}x** the GPU-hours "
                        f"({r['gpu_hours_saved']:.1f} GPU-hours saved)."])


def resident(data: dict[str, Any]) -> str:
    rows = [[r["mode"], r["processes"], r["tasks"], f"{r['total_s']:.1f}", f"{r['per_task_s']:.2f}",
             f"{r['startup_s']:.2f}", f"{r['task_s']:.2f}"] for r in data["rows"]]
    s = data["settings"]
    return "\n\n".join([machine_line(data),
                        md_table(["mode", "processes", "tasks", "total s", "per task s", "startup s (each)",
                                  "task s (each)"], rows),
                        f"{s['tasks']} fine-tune tasks (cf {s['condition_frames']}, {s['steps']} steps): one process "
                        f"per task takes **{data['ratio']:.2f}x** the wall time per task of the resident worker "
                        f"({data['ratio_steady_state']:.2f}x a long-lived worker's steady state)."])


RENDERERS = {"plan": plan, "claims": claims, "overhead": overhead, "resident": resident}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    for name, render in RENDERERS.items():
        path = args.out_dir / f"{name}.json"
        if path.exists():
            print(f"### {name}\n\n{render(json.loads(path.read_text()))}\n")
        else:
            print(f"### {name}\n\n(no {path})\n")


if __name__ == "__main__":
    main()
