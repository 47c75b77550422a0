"""Per-task wall time of a slow-loading model: resident server vs the same script as a command runner.

The model (bench/servers/slow_model.py) takes L seconds to load (a sleep plus a few hundred MB
allocated and touched) and T seconds a task. Both ways run the same rows through hparray itself
(`plan --search lr`, then `submit --local --workers 1`: the real worker, store and scoring):

resident   runner.name resident: the worker starts the server once and sends it every row
command    runner.name command: the worker starts the script for every row, which loads each time

Per-task wall = the submit's wall / rows, measured side by side in one run. The ratio is what
loading once saves; docs/resident.md projects it onto a real model's 60-180 s load.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SERVER = Path(__file__).resolve().parent / "servers" / "slow_model.py"
RUN_TIMEOUT_S = 1800


def hparray(root: Path, *args: str, env: dict[str, str]) -> float:
    """Run `python -m hparray ARGS` in the project `root`; its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hparray", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"hparray {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def run_way(root: Path, runner: dict[str, Any], videos: int, env: dict[str, str]) -> dict[str, Any]:
    """Plan and run the lr search at one lr on `videos` videos with `runner`; what it took."""
    from bench.common import bench_project

    root.mkdir(parents=True)
    bench_project(root, {"data": {"num_videos": videos}, "metrics": ["psnr"], "runner": runner},
                  searches={"lr": [1e-5]})
    hparray(root, "plan", "--search", "lr", env=env)
    wall = hparray(root, "submit", "--local", "--workers", "1", env=env)
    with sqlite3.connect(root / "results.db") as conn:
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall())
        walls = [row[0] for row in conn.execute(
            "SELECT ended_at - started_at FROM attempts WHERE outcome = 'done'").fetchall()]
    rows = sum(statuses.values())
    if statuses != {"done": rows}:
        raise RuntimeError(f"{runner['name']}: rows not all done: {statuses}")
    return {"mode": runner["name"], "rows": rows, "wall_s": wall, "per_task_s": wall / rows,
            "attempt_s": sum(walls) / len(walls)}


def main(argv: list[str] | None = None) -> None:
    from bench.common import REPO, console, load_line, machine, table, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8, help="videos (rows = 2 x videos: baseline + fine-tune)")
    parser.add_argument("--load-s", type=float, default=5.0, help="L: the model's load time")
    parser.add_argument("--alloc-mb", type=int, default=300, help="memory the load allocates")
    parser.add_argument("--task-s", type=float, default=0.5, help="T: the model's time per task")
    args = parser.parse_args(argv)
    info = machine()
    env = {**os.environ, "SLOW_MODEL_LOAD_S": str(args.load_s), "SLOW_MODEL_ALLOC_MB": str(args.alloc_mb),
           "SLOW_MODEL_TASK_S": str(args.task_s), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("HPARRAY_DB", None)
    ways = {
        "resident": {"name": "resident", "command": [sys.executable, str(SERVER), "--serve"], "timeout_s": 600},
        "command": {"name": "command", "command": [sys.executable, str(SERVER), "{condition_video}",
                                                   "{num_frames}", "{output_dir}"], "timeout_s": 600},
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="hparray-bench-server-") as tmp:
        for name, runner in ways.items():
            console.print(f"{name}: {2 * args.videos} rows ...")
            rows.append(run_way(Path(tmp) / name, runner, args.videos, env))
    resident, command = rows
    ratio = command["per_task_s"] / resident["per_task_s"]
    steady = command["attempt_s"] / resident["attempt_s"]  # a long-lived worker, its start paid off
    console.print(table(
        f"Slow-loading model (L = {args.load_s:g} s, {args.alloc_mb} MB; T = {args.task_s:g} s a task): "
        "per-task wall through hparray",
        ["runner", "rows", "submit wall s", "per task s", "attempt s (mean)"],
        [[r["mode"], r["rows"], f"{r['wall_s']:.1f}", f"{r['per_task_s']:.2f}", f"{r['attempt_s']:.2f}"]
         for r in rows],
        caption=(f"submit wall includes the worker's start (and the resident server's one load); attempt = one "
                 f"row's claim to finish; command / resident: {ratio:.2f}x per task over {resident['rows']} rows, "
                 f"{steady:.2f}x per attempt; {load_line(info)}")))
    path = write_json("server", info, rows, ratio=ratio, ratio_per_attempt=steady,
                      settings={"videos": args.videos, "load_s": args.load_s, "alloc_mb": args.alloc_mb,
                                "task_s": args.task_s})
    console.print(f"command runner / resident runner: {ratio:.2f}x wall per task over {resident['rows']} rows, "
                  f"{steady:.2f}x per attempt")
    console.print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
