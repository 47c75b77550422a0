"""Per-row overhead at the seed's geometry (49 frames of 640x360): GPU-idle seconds between rows with
and without the background stage, side by side in one run; and bytes per row of each `artifacts:`
setting at 64x64, 360p and 720p, with the lossless default's recomputation error.

The GPU's part of a row is played by a stand-in runner that sleeps (--gpu-s, the GPU's share of a
row) and returns float frames of the real size; everything else is hparray's real code: the worker
loop (hparray.worker.runtime.run_worker) on an SQLite store, PSNR + SSIM on the CPU, the artifacts
and the result recording. The runner notes when each row's GPU part starts and ends, so the idle
time between rows is measured where the GPU would see it, not inferred from the parts.

Extrapolation to a 5-minute row: with the stage off the GPU waits, per row, for everything hparray
does (claim, plan check, scoring, artifacts, finish); with it on, only for the claim and the plan
check, while scoring runs beside the next row's fine-tune. The measured idle per row over 300 s is
the share of GPU time lost.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bench.common import REPO, bench_project, console, load_line, machine, table, write_json

FIVE_MINUTES_S = 300.0
SIZES = {"64x64": (49, 64, 64), "360p": (49, 360, 640), "720p": (113, 720, 1280)}


class GpuStandIn:
    """A runner whose GPU part is a sleep: returns the conditioning frames and, for the rest, the
    last one drifting with a little noise (float32, like a model's output). Notes its busy windows."""

    windows: ClassVar[list[tuple[float, float]]] = []
    gpu_s: ClassVar[float] = 12.0

    def __init__(self, runner: dict[str, Any], model: dict[str, Any], device: str):
        self.rng = np.random.default_rng(0)

    def load(self) -> None:
        pass

    def _generate(self, clip: Any, condition_frames: int) -> Any:
        from hparray.runners import Generation

        started = time.monotonic()
        time.sleep(self.gpu_s)
        last = clip.frames[condition_frames - 1]
        steps = np.arange(1, clip.num_frames - condition_frames + 1, dtype=np.float32)[:, None, None, None]
        rest = np.roll(last, 1, axis=1)[None] * (1 - 0.002 * steps) + 0.002 * steps * 0.5
        rest = rest + self.rng.normal(0, 0.01, rest.shape).astype(np.float32)
        frames = np.clip(np.concatenate([clip.frames, rest]), 0, 1).astype(np.float32)
        GpuStandIn.windows.append((started, time.monotonic()))
        return Generation(frames=frames, timings_s={"finetune": self.gpu_s, "inference": 0.0}, peak_memory_mb=0.0)

    def baseline(self, clip: Any, condition_frames: int, seed: int) -> Any:
        return self._generate(clip, condition_frames)

    def finetune_and_generate(self, clip: Any, hp: Any, seed: int) -> Any:
        return self._generate(clip, hp.condition_frames)


@dataclass
class Sweep:
    background: bool
    rows: int
    wall_s: float
    gpu_busy_s: float
    idle_per_row_s: float  # between one row's GPU part and the next one's
    claim_ms: float
    check_ms: float
    read_s: float  # the video, read and resized (cached per video: rows go video by video)
    finish_ms: float
    heartbeat_ms: float
    scoring_s: float
    artifacts_s: float


class Timer:
    """Wraps methods and sums their wall time by name (from any thread)."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.totals.setdefault(name, []).append(time.perf_counter() - started)

        setattr(owner, attribute, timed)
        self.undo.append((owner, attribute, original))

    def restore(self) -> None:
        for owner, attribute, original in reversed(self.undo):
            setattr(owner, attribute, original)

    def mean(self, name: str) -> float:
        values = self.totals.get(name, [])
        return float(np.mean(values)) if values else 0.0


def write_videos(folder: Path, count: int) -> Path:
    """`count` videos already at 640x360 (what a real source decodes to, so reading one costs a
    decode, not the upscaling of the 64x64 sample set), in a folder source with one category."""
    frames, height, width = SIZES["360p"]
    (folder / "pan").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        video = sample_frames(frames, height, width, index)
        np.save(folder / "pan" / f"pan_{index}.npy", (video * 255 + 0.5).astype(np.uint8))
    return folder


def run_sweep(root: Path, videos: Path, count: int, background: bool) -> Sweep:
    """The baseline rows and one fine-tune row per video at 360p, one worker, the stand-in runner."""
    import hparray.experiment as experiment_module
    from hparray.config import load_sweep
    from hparray.experiment import Experiment
    from hparray.metrics import Scorer
    from hparray.plan import build_plan, select_videos
    from hparray.store import Store
    from hparray.worker.runtime import run_worker

    frames, height, width = SIZES["360p"]
    config_dir = bench_project(root, {
        "runner": {"name": "bench.bench_pipeline:GpuStandIn"},
        "data": {"source": str(videos), "num_videos": count, "num_frames": frames, "height": height,
                 "width": width},
        "metrics": ["psnr", "ssim"],
        "output_dir": str(root / "results"),
        "tasks": {"heartbeat_interval_s": 1, "heartbeat_grace_s": 300, "background_scoring": background},
    }, searches={"lr": [1e-5]})
    sweep = load_sweep(config_dir)
    plan = build_plan(sweep, "all", select_videos(sweep.settings))
    store = Store.open(str(root / "results.db"))
    store.apply_plan(plan.config_rows(), plan.search_config_rows(), plan.video_rows(), plan.tasks,
                     sweep.settings.tasks.max_attempts, time.time())
    timer = Timer()
    for attribute in ("claim", "finish", "heartbeat"):
        timer.wrap(store, attribute, attribute)
    timer.wrap(Experiment, "matches_plan", "check")
    timer.wrap(Experiment, "frames", "read")
    timer.wrap(Scorer, "score_frames", "scoring")
    timer.wrap(experiment_module, "stage_artifacts", "artifacts")
    from bench.bench_pipeline import GpuStandIn as runner  # the class the worker builds (not __main__'s)

    runner.windows.clear()
    started = time.monotonic()
    try:
        run_worker(sweep.settings, store, poll_s=0.1)
    finally:
        timer.restore()
        store.close()
    wall = time.monotonic() - started
    windows = sorted(runner.windows)
    gaps = [nxt[0] - prev[1] for prev, nxt in zip(windows, windows[1:], strict=False)]
    return Sweep(background=background, rows=len(windows), wall_s=wall,
                 gpu_busy_s=sum(end - start for start, end in windows),
                 idle_per_row_s=float(np.mean(gaps)) if gaps else 0.0,
                 claim_ms=timer.mean("claim") * 1e3, check_ms=timer.mean("check") * 1e3,
                 read_s=sum(timer.totals.get("read", [])) / max(1, len(windows)),
                 finish_ms=timer.mean("finish") * 1e3, heartbeat_ms=timer.mean("heartbeat") * 1e3,
                 scoring_s=sum(timer.totals.get("scoring", [])) / max(1, len(windows)),
                 artifacts_s=timer.mean("artifacts"))


def sample_frames(frames: int, height: int, width: int, index: int = 0) -> np.ndarray:
    """A bundled sample video at this size, drifted and with a little noise: float output as a model
    gives it (smooth content, not the uint8 values of its input)."""
    from hparray.demo.sample_videos import generate_video

    square = generate_video("pan", index, index, frames, width)
    top = (width - height) // 2
    video = square[:, top:top + height].astype(np.float32) / 255.0
    rng = np.random.default_rng(1)
    return np.clip(video * 0.97 + 0.015 + rng.normal(0, 0.01, video.shape), 0, 1).astype(np.float32)


def artifact_sizes(scratch: Path) -> list[dict[str, Any]]:
    """Bytes and seconds per row for each setting at each size, and the default's recomputation error."""
    from hparray.artifacts import KINDS, read_frames, stage_artifacts
    from hparray.metrics import Scorer

    out = []
    for label, (frames, height, width) in SIZES.items():
        video = sample_frames(frames, height, width)
        for kind in KINDS:
            started = time.perf_counter()
            staged = stage_artifacts(video, scratch / f"{label}-{kind}", 25, "bench", kind)
            seconds = time.perf_counter() - started
            size = sum(f.stat().st_size for f in staged.iterdir()) if staged is not None else 0
            row: dict[str, Any] = {"size": label, "frames": frames, "kind": kind, "bytes": size, "write_s": seconds}
            if kind == "lossless" and staged is not None:
                back = read_frames(staged)
                assert back is not None
                row["max_value_error"] = float(np.abs(back - video).max())
                if label != "720p":  # SSIM on 113 frames of 720p takes minutes on one core
                    truth = np.clip(video + np.random.default_rng(2).normal(0, 0.05, video.shape), 0, 1)
                    scorer = Scorer(["psnr", "ssim"], "cpu")
                    first = frames // 2
                    direct = scorer.score_frames(video, truth.astype(np.float32), first)
                    again = scorer.score_frames(back, truth.astype(np.float32), first)
                    row["max_psnr_db_change"] = float(np.abs(np.subtract(direct["psnr"], again["psnr"])).max())
                    row["max_ssim_change"] = float(np.abs(np.subtract(direct["ssim"], again["ssim"])).max())
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4, help="videos: one baseline + one fine-tune row each")
    parser.add_argument("--gpu-s", type=float, default=12.0,
                        help="seconds the stand-in's GPU part of a row sleeps (longer than scoring a 360p row)")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS (1: steady on shared cores)")
    parser.add_argument("--no-sizes", action="store_true", help="skip the bytes-per-row table")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = args.threads
    from bench.bench_pipeline import GpuStandIn as runner

    runner.gpu_s = args.gpu_s
    info = machine()
    with tempfile.TemporaryDirectory(prefix="hparray-pipeline-") as tmp:
        videos = write_videos(Path(tmp) / "videos", args.videos)
        sweeps = [run_sweep(Path(tmp) / ("on" if background else "off"), videos, args.videos, background)
                  for background in (False, True)]
        sizes = [] if args.no_sizes else artifact_sizes(Path(tmp) / "sizes")

    off, on = sweeps
    console.print(table(
        f"GPU idle between rows, 49x360x640, PSNR + SSIM, stand-in GPU part {args.gpu_s:.1f} s per row",
        ["background stage", "rows", "wall s", "GPU busy s", "GPU idle per row s", "claim ms", "check ms", "read s/row",
         "finish ms", "heartbeat ms", "scoring s/row", "artifacts s/row", "idle share of a 5-min row"],
        [["on" if s.background else "off", s.rows, f"{s.wall_s:.1f}", f"{s.gpu_busy_s:.1f}",
          f"{s.idle_per_row_s:.3f}", f"{s.claim_ms:.1f}", f"{s.check_ms:.1f}", f"{s.read_s:.2f}", f"{s.finish_ms:.1f}",
          f"{s.heartbeat_ms:.1f}", f"{s.scoring_s:.2f}", f"{s.artifacts_s:.2f}",
          f"{s.idle_per_row_s / FIVE_MINUTES_S:.3%}"] for s in sweeps],
        caption=(f"idle per row: from the end of one row's GPU part to the start of the next one's; "
                 f"off/on = {off.idle_per_row_s / max(on.idle_per_row_s, 1e-9):.0f}x; {load_line(info)}")))
    if sizes:
        console.print(table(
            "Bytes per row for each artifacts setting", ["size", "frames", "setting", "MB", "write s",
                                                          "max |value| error", "max PSNR change dB", "max SSIM change"],
            [[r["size"], r["frames"], r["kind"], f"{r['bytes'] / 1e6:.2f}", f"{r['write_s']:.2f}",
              f"{r['max_value_error']:.5f}" if "max_value_error" in r else "",
              f"{r['max_psnr_db_change']:.5f}" if "max_psnr_db_change" in r else "",
              f"{r['max_ssim_change']:.6f}" if "max_ssim_change" in r else ""] for r in sizes],
            caption="lossless = frames.mkv (FFV1, uint8) + generated.mp4; full = float32 frames.npz + mp4; "
                    "the errors are of frames read back from frames.mkv (bound: 0.5/255 = 0.00196 per value)"))
    path = write_json("pipeline", info, [asdict(s) for s in sweeps], sizes=sizes, gpu_s=args.gpu_s,
                      idle_ratio=off.idle_per_row_s / max(on.idle_per_row_s, 1e-9))
    console.print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
