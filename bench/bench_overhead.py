"""Orchestration overhead per task on the tiny real runner (LTX-Video, PSNR + SSIM, 49 frames of
64x64), through the real worker loop (hparray.worker.runtime.run_worker) on an SQLite store.

Per task it times what hparray adds around the runner: the claim, the plan check and artifact
folder lookup, recording the result (finish), writing the artifacts, the heartbeats (a thread,
concurrent with the task) and the reaper's passes. The model's one-time load is the worker's,
not the task's, and is reported apart.

Extrapolation to a 5-minute task: the per-task costs (claim, check, finish, artifacts) do not
depend on how long the task runs; the worker's reaper pass runs between tasks at most every
heartbeat_grace_s / 4 (75 s), so once per 5-minute task; heartbeats come every
tasks.heartbeat_interval_s (30 s: 10 per 5 minutes) from a thread beside the task, so they
lengthen it by their CPU time at most (their wall time is mostly fsync, reported as an upper
bound). Artifacts grow with the frames: a second measurement writes 49 frames at 640x360 (the
first experiment's 360p) to show how much. The store runs in the shared-filesystem mode
(rollback journal) unless --journal wal, on this machine's local disk: a network filesystem
adds its round trips to claim, finish and heartbeat.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.common import REPO, bench_project, console, load_line, machine, table, tiny_model_path, write_json

FIVE_MINUTES_S = 300.0
PRODUCTION_HEARTBEAT_S = 30.0
ACCEPTANCE_SHARE = 0.001  # 0.1 %


@dataclass
class Call:
    """One timed call: what, on which thread, when (monotonic), wall and thread CPU seconds."""

    name: str
    thread: str
    start: float
    wall_s: float
    cpu_s: float
    task_id: int | None = None


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, name: str, fn: Callable[..., Any], task_of: Callable[[tuple[Any, ...], Any], int | None]
             ) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.monotonic(), time.thread_time()
            result = fn(*args, **kwargs)
            call = Call(name, threading.current_thread().name, start, time.monotonic() - start,
                        time.thread_time() - cpu, task_of(args, result))
            with self.lock:
                self.calls.append(call)
            return result

        return timed


@dataclass
class TaskRow:
    task_id: int
    kind: str
    wall_s: float  # claim start -> finish end, minus the worker's one-time model load
    claim_ms: float
    check_ms: float  # plan check + artifact folder lookup + expected-duration lookup
    artifacts_ms: float
    finish_ms: float
    heartbeats: int
    heartbeat_ms: float  # beside the task (a thread), not in overhead_ms
    reaps: int
    reap_ms: float
    overhead_ms: float  # claim + check + artifacts + finish + reaps: what lengthens the task
    share: float


def _task_arg(args: tuple[Any, ...], _result: Any) -> int | None:
    task = args[0] if args else None
    return getattr(task, "id", None)


def _claimed(_args: tuple[Any, ...], result: Any) -> int | None:
    return getattr(result, "id", None)


def _none(_args: tuple[Any, ...], _result: Any) -> None:
    return None


def run_sweep(root: Path, videos: int, steps: int, journal: str, model_path: str | None) -> tuple[Recorder, Any]:
    """Plan one lr point (the baseline) on `videos` videos and run one real worker over it."""
    import hparray.experiment as experiment_module
    from hparray.config import load_sweep
    from hparray.experiment import Experiment
    from hparray.plan import build_plan, select_videos
    from hparray.store import Store
    from hparray.worker.runtime import run_worker

    config_dir = bench_project(root, {
        "baseline": {"finetune_steps": steps},
        "data": {"num_videos": videos},
        "metrics": ["psnr", "ssim"],
        "model": {"path": model_path},
        "output_dir": str(root / "results"),
        # Short enough to see several beats in a task of seconds; the extrapolation uses 30 s.
        # One row at a time, so each call belongs to one row's window (bench_pipeline measures the stage).
        "tasks": {"heartbeat_interval_s": 0.5, "heartbeat_grace_s": 120, "background_scoring": False},
    }, searches={"lr": [1e-5]})
    sweep = load_sweep(config_dir)
    plan = build_plan(sweep, "all", select_videos(sweep.settings))
    os.environ["HPARRAY_SQLITE_JOURNAL"] = journal
    store = Store.open(str(root / "results.db"))
    store.apply_plan(plan.config_rows(), plan.search_config_rows(), plan.video_rows(), plan.tasks,
                     sweep.settings.tasks.max_attempts, time.time())

    recorder = Recorder()
    for name, task_of in (("claim", _claimed), ("heartbeat", _task_arg), ("finish", _task_arg),
                          ("fetch", _none), ("scalar", _none), ("reap", _none), ("waiting_work", _none)):
        setattr(store, name, recorder.wrap(name, getattr(store, name), task_of))
    originals = (experiment_module.stage_artifacts, Experiment.matches_plan, Experiment.load)
    experiment_module.stage_artifacts = recorder.wrap("artifacts", experiment_module.stage_artifacts, _none)
    Experiment.matches_plan = recorder.wrap("check", Experiment.matches_plan,  # type: ignore[method-assign]
                                            lambda args, _r: getattr(args[1], "id", None))
    Experiment.load = recorder.wrap("load", Experiment.load, _none)  # type: ignore[method-assign]
    try:
        summary = run_worker(sweep.settings, store)
    finally:
        experiment_module.stage_artifacts = originals[0]
        Experiment.matches_plan = originals[1]  # type: ignore[method-assign]
        Experiment.load = originals[2]  # type: ignore[method-assign]
        store.close()
    return recorder, summary


def task_rows(recorder: Recorder, kinds: dict[int, str]) -> list[TaskRow]:
    """Attribute every recorded call to the task whose window [claim start, finish end] holds it;
    a model load inside a window is the worker's one-time cost and comes off that task's wall."""
    calls = sorted(recorder.calls, key=lambda c: c.start)
    claims = [c for c in calls if c.name == "claim" and c.task_id is not None]
    finishes = {c.task_id: c for c in calls if c.name == "finish"}
    rows = []
    for claim in claims:
        assert claim.task_id is not None
        finish = finishes[claim.task_id]
        end = finish.start + finish.wall_s
        inside = [c for c in calls if claim.start <= c.start <= end]

        def total(*names: str, inside: list[Call] = inside) -> float:
            return sum(c.wall_s for c in inside if c.name in names)

        wall = end - claim.start - total("load")
        beats = [c for c in inside if c.name == "heartbeat"]
        reaps = [c for c in inside if c.name == "reap"]
        # On the task's path; heartbeats run beside it and are reported apart.
        overhead = total("claim", "check", "fetch", "scalar", "artifacts", "finish", "reap")
        rows.append(TaskRow(
            task_id=claim.task_id, kind=kinds.get(claim.task_id, "?"), wall_s=round(wall, 3),
            claim_ms=round(total("claim") * 1e3, 2), check_ms=round(total("check", "fetch", "scalar") * 1e3, 2),
            artifacts_ms=round(total("artifacts") * 1e3, 2), finish_ms=round(total("finish") * 1e3, 2),
            heartbeats=len(beats), heartbeat_ms=round(total("heartbeat") * 1e3, 2),
            reaps=len(reaps), reap_ms=round(total("reap") * 1e3, 2),
            overhead_ms=round(overhead * 1e3, 2), share=overhead / wall if wall > 0 else 0.0,
        ))
    return rows


def artifacts_at(frames: int, height: int, width: int, scratch: Path) -> tuple[float, int]:
    """Seconds to write one task's artifacts (the default lossless frames.mkv + generated.mp4) at this size, and bytes.

    The frames are a smooth moving pattern plus a little noise, like a model's float output."""
    from hparray.artifacts import stage_artifacts

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    video = np.stack([np.stack([0.5 + 0.5 * np.sin((x + 3 * t) / 40), y / height,
                                0.5 + 0.5 * np.cos((y - 2 * t) / 30)], axis=-1) for t in range(frames)])
    video = np.clip(video + rng.normal(0, 0.01, video.shape), 0, 1).astype(np.float32)
    target = scratch / f"artifacts-{width}x{height}"
    started = time.perf_counter()
    staged = stage_artifacts(video, target, 25, "bench")
    seconds = time.perf_counter() - started
    assert staged is not None
    return seconds, sum(f.stat().st_size for f in staged.iterdir())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=2, help="videos: one baseline + one fine-tune row each")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps of the fine-tune rows")
    parser.add_argument("--journal", default="delete", choices=["delete", "wal"],
                        help="SQLite journal (delete = the shared-filesystem mode, the slower one)")
    parser.add_argument("--no-360p", action="store_true", help="skip the 640x360 artifact measurement")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the worker's steps")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS (1: steady on shared cores)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = args.threads  # before torch is imported
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s")
    info = machine()
    with tempfile.TemporaryDirectory(prefix="hparray-overhead-") as tmp:
        root = Path(tmp)
        model_path = tiny_model_path(root)
        recorder, summary = run_sweep(root, args.videos, args.steps, args.journal, model_path)
        done = {row.task_id: row for row in _results(root)}
        load_s = max((c.wall_s for c in recorder.calls if c.name == "load"), default=0.0)
        rows = task_rows(recorder, {tid: r.kind for tid, r in done.items()})
        big = None if args.no_360p else artifacts_at(49, 360, 640, root)
        small = artifacts_at(49, 64, 64, root)

    finetunes = [r for r in rows if r.kind == "finetune"] or rows
    mean = {key: float(np.mean([getattr(r, key) for r in finetunes])) for key in
            ("wall_s", "claim_ms", "check_ms", "artifacts_ms", "finish_ms")}
    beats = [c for c in recorder.calls if c.name == "heartbeat"]
    reaps = [c for c in recorder.calls if c.name == "reap"]
    beat_ms = float(np.mean([c.wall_s for c in beats]) * 1e3) if beats else 0.0
    beat_cpu_ms = float(np.mean([c.cpu_s for c in beats]) * 1e3) if beats else 0.0
    reap_ms = float(np.mean([c.wall_s for c in reaps]) * 1e3) if reaps else 0.0
    store_ms = mean["claim_ms"] + mean["check_ms"] + mean["finish_ms"] + reap_ms
    beats_5min = FIVE_MINUTES_S / PRODUCTION_HEARTBEAT_S
    total_ms = store_ms + mean["artifacts_ms"] + beats_5min * beat_cpu_ms
    upper_ms = store_ms + mean["artifacts_ms"] + beats_5min * beat_ms
    x: dict[str, Any] = {
        "claim_ms": mean["claim_ms"], "check_ms": mean["check_ms"], "finish_ms": mean["finish_ms"],
        "reap_ms": reap_ms, "store_ms": store_ms, "artifacts_ms": mean["artifacts_ms"],
        "heartbeat_ms": beat_ms, "heartbeat_cpu_ms": beat_cpu_ms, "heartbeats_per_5min": beats_5min,
        "total_5min_ms": total_ms, "share_5min": total_ms / (FIVE_MINUTES_S * 1e3),
        "upper_5min_ms": upper_ms, "share_5min_upper": upper_ms / (FIVE_MINUTES_S * 1e3),
        "store_share_5min": (store_ms + beats_5min * beat_cpu_ms) / (FIVE_MINUTES_S * 1e3),
        "artifacts_64x64_s": small[0], "artifacts_64x64_bytes": small[1],
        "artifacts_360p_s": big[0] if big else None, "artifacts_360p_bytes": big[1] if big else None,
        "model_load_s": load_s, "journal": args.journal, "finetune_steps": args.steps,
        "mean_finetune_wall_s": mean["wall_s"],
    }
    if big:
        x["share_5min_360p"] = (total_ms - mean["artifacts_ms"] + big[0] * 1e3) / (FIVE_MINUTES_S * 1e3)

    console.print(table(
        f"Orchestration per task: tiny LTX runner, PSNR+SSIM, 49x64x64, SQLite {args.journal} journal",
        ["task", "kind", "wall s", "claim ms", "check ms", "artifacts ms", "finish ms", "heartbeats (ms)",
         "reaps (ms)", "overhead ms", "share"],
        [[r.task_id, r.kind, f"{r.wall_s:.2f}", f"{r.claim_ms:.1f}", f"{r.check_ms:.1f}", f"{r.artifacts_ms:.1f}",
          f"{r.finish_ms:.1f}", f"{r.heartbeats} ({r.heartbeat_ms:.1f})", f"{r.reaps} ({r.reap_ms:.1f})",
          f"{r.overhead_ms:.1f}", f"{r.share:.3%}"] for r in rows],
        caption=(f"overhead = claim + check + artifacts + finish + reaps, what lengthens a task; heartbeats run "
                 f"beside it (every 0.5 s here, to measure them); model load {load_s:.1f} s once per worker, "
                 f"before its first claim; {load_line(info)}")))
    lines = [
        ["claim + plan check + finish", f"{mean['claim_ms'] + mean['check_ms'] + mean['finish_ms']:.1f} ms",
         "once per task"],
        ["reaper pass", f"{reap_ms:.1f} ms", "at most once per task (every 75 s, between tasks)"],
        ["artifacts: frames.mkv + generated.mp4, 49x64x64", f"{mean['artifacts_ms']:.1f} ms", "once per task"],
        ["heartbeat: thread CPU (wall)", f"{beat_cpu_ms:.1f} ms ({beat_ms:.1f} ms)",
         f"{beats_5min:.0f} per 5 min, beside the task"],
        ["total: what a 5-minute task is lengthened by", f"{total_ms:.0f} ms", f"{x['share_5min']:.3%} of 300 s"],
        ["  of which the store (claim, check, finish, reap, heartbeats)",
         f"{store_ms + beats_5min * beat_cpu_ms:.0f} ms", f"{x['store_share_5min']:.3%} of 300 s"],
        ["upper bound: heartbeats at their full wall time", f"{upper_ms:.0f} ms",
         f"{x['share_5min_upper']:.3%} of 300 s"],
    ]
    if big:
        lines.append(["with 49x360x640 artifacts instead", f"{(total_ms - mean['artifacts_ms']) + big[0] * 1e3:.0f} ms",
                      f"{x['share_5min_360p']:.3%} of 300 s (artifacts {big[0] * 1e3:.0f} ms, {big[1] / 1e6:.0f} MB)"])
    console.print(table("Extrapolated to a 5-minute task (heartbeat every 30 s, grace 300 s)",
                        ["what", "time", "how often / share"], lines))
    verdict = x["share_5min"] < ACCEPTANCE_SHARE
    console.print(f"acceptance: orchestration {x['share_5min']:.3%} of a 5-minute task (< 0.1%): "
                  f"{'PASS' if verdict else 'FAIL'}")
    path = write_json("overhead", info, [asdict(r) for r in rows], extrapolation=x,
                      worker=dataclasses.asdict(summary),
                      acceptance={"share_5min": x["share_5min"], "pass": verdict})
    console.print(f"wrote {path.relative_to(REPO)}")


def _results(root: Path) -> list[Any]:
    """(task_id, kind, load_s) of every recorded result, read straight from the database."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(root / "results.db")) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT r.task_id, t.kind, r.load_s FROM results AS r JOIN tasks AS t ON t.id = r.task_id")
        return [SimpleNamespace(**dict(row)) for row in rows]


if __name__ == "__main__":
    main()
