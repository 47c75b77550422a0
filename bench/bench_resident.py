"""Per-task wall time with the model resident vs one process per task, on the tiny LTX model.

resident     one process runs N fine-tune tasks: imports torch + diffusers and builds the model
             once, then each task fine-tunes, generates, scores and restores the base weights
             (what an hparray worker does)
per process  N fresh `python` processes, each importing torch + diffusers, building the model and
             running one task (what the naive per-video script does)

Both run the same N tasks (lr 1e-5, condition_frames 22, 20 fine-tuning steps, PSNR + SSIM,
49 frames of 64x64) through hparray.experiment.Experiment, without a database. Walls are
measured by this parent process around each child, so interpreter start and imports count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD_TIMEOUT_S = 900


def child(config_dir: str, tasks_file: str) -> None:
    """Run the tasks listed in `tasks_file` in this process; print a JSON line of how long what took."""
    started = time.perf_counter()
    import torch  # noqa: F401  (what every per-video script pays for)
    from diffusers import LTXConditionPipeline  # noqa: F401

    from hparray.config import load_settings
    from hparray.experiment import Experiment
    from hparray.tasks import ClaimedTask

    settings = load_settings(Path(config_dir))
    tasks = [ClaimedTask(**fields) for fields in json.loads(Path(tasks_file).read_text())]
    imported = time.perf_counter()
    experiment = Experiment(settings, device="cpu")
    experiment.load()
    loaded = time.perf_counter()
    walls = []
    for task in tasks:
        begin = time.perf_counter()
        outcome = experiment.run(task, [])
        walls.append(time.perf_counter() - begin)
        if outcome.status != "done":
            print(f"task on {task.video} {outcome.status}", file=sys.stderr)
    print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "task_walls_s": walls}))


def write_tasks(path: Path, config_dir: Path, indices: list[int], args: argparse.Namespace) -> Path:
    """The fine-tune tasks on the sweep's videos `indices`, as ClaimedTask fields (JSON)."""
    from dataclasses import asdict

    from hparray.config import load_settings
    from hparray.plan import select_videos, video_seed
    from hparray.tasks import ClaimedTask

    videos = select_videos(load_settings(config_dir))
    tasks = [asdict(ClaimedTask(id=i + 1, lease="bench", attempt=1, max_attempts=1, kind="finetune",
                                config_hash="bench", video=videos[i].name, video_path=videos[i].path,
                                category=videos[i].category, caption=videos[i].caption,
                                video_seed=video_seed(videos[i].name), lr=args.lr, condition_frames=args.cf,
                                finetune_steps=args.steps, estimate_s=300.0)) for i in indices]
    path.write_text(json.dumps(tasks))
    return path


def run_child(config_dir: Path, tasks_file: Path) -> tuple[float, dict[str, Any]]:
    """(wall seconds of a fresh interpreter running the tasks in `tasks_file`, its own report)."""
    command = [sys.executable, "-c", "import sys; from bench.bench_resident import child; child(*sys.argv[1:])",
               str(config_dir), str(tasks_file)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from bench.common import REPO, bench_project, console, load_line, machine, table, tiny_model_path, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=6, help="fine-tune tasks each way (N)")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per task")
    parser.add_argument("--cf", type=int, default=22, help="condition frames")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS for both ways (1: steady on shared cores)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = args.threads
    info = machine()
    with tempfile.TemporaryDirectory(prefix="hparray-resident-") as tmp:
        root = Path(tmp)
        config_dir = bench_project(root, {"data": {"num_videos": args.tasks}, "metrics": ["psnr", "ssim"],
                                          "model": {"path": tiny_model_path(root)}})
        indices = list(range(args.tasks))
        console.print(f"resident: 1 process x {args.tasks} tasks ...")
        resident_wall, resident = run_child(config_dir, write_tasks(root / "all.json", config_dir, indices, args))
        per_process: list[tuple[float, dict[str, Any]]] = []
        for i in indices:
            console.print(f"per process: task {i + 1}/{args.tasks} ...")
            per_process.append(run_child(config_dir, write_tasks(root / f"task{i}.json", config_dir, [i], args)))

    n = args.tasks
    resident_per_task = resident_wall / n
    process_walls = [wall for wall, _ in per_process]
    process_per_task = sum(process_walls) / n
    steady = sum(resident["task_walls_s"]) / n  # a long-lived worker's per-task wall
    startup = [wall - sum(report["task_walls_s"]) for wall, report in per_process]
    rows = [
        {"mode": "resident (1 process, N tasks)", "processes": 1, "tasks": n, "total_s": resident_wall,
         "per_task_s": resident_per_task, "startup_s": resident_wall - sum(resident["task_walls_s"]),
         "task_s": steady},
        {"mode": "one process per task", "processes": n, "tasks": n, "total_s": sum(process_walls),
         "per_task_s": process_per_task, "startup_s": sum(startup) / n,
         "task_s": sum(sum(r["task_walls_s"]) for _, r in per_process) / n},
    ]
    ratio = process_per_task / resident_per_task
    ratio_steady = process_per_task / steady
    console.print(table(
        f"Per-task wall: {n} fine-tune tasks (cf {args.cf}, {args.steps} steps, PSNR+SSIM, 49x64x64)",
        ["mode", "processes", "total s", "per task s", "startup s (each)", "task s (each)"],
        [[r["mode"], r["processes"], f"{r['total_s']:.1f}", f"{r['per_task_s']:.2f}", f"{r['startup_s']:.2f}",
          f"{r['task_s']:.2f}"] for r in rows],
        caption=(f"startup = interpreter + import torch/diffusers + build the model; "
                 f"one process per task is {ratio:.2f}x slower per task at N={n} "
                 f"({ratio_steady:.2f}x a long-lived worker's steady state); {load_line(info)}")))
    path = write_json("resident", info, rows, ratio=ratio, ratio_steady_state=ratio_steady,
                      settings={"tasks": n, "steps": args.steps, "condition_frames": args.cf, "lr": args.lr},
                      resident_report=resident, per_process_reports=[r for _, r in per_process])
    console.print(f"one process per task / resident: {ratio:.2f}x per task at N={n}; "
                  f"{ratio_steady:.2f}x against a long-lived worker")
    console.print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
