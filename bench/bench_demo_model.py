"""Does the shipped demo model make `make demo`'s numbers mean something?

On the videos `make demo` scores (the bundled sample set, held out from training; the same
stratified selection, frames, seeds and model settings as configs/base.yaml), it scores:
- the trivial predictor (last conditioning frame repeated),
- the same architecture randomly initialised (what the built-in model was before training),
- the shipped model without fine-tuning,
- the shipped model fine-tuned at the baseline config and at other learning rates.
Means carry the report's bootstrap 95% CI; fine-tuned configs also get the paired difference
from the un-fine-tuned model (same video, same seed), with its bootstrap CI. LPIPS is scored
only when the genuine AlexNet weights are on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, console, load_line, machine, table, write_json
from hparray.config import load_settings, load_sweep
from hparray.metrics import Scorer, lpips_weights_status, trivial_prediction
from hparray.plan import select_videos, task_seed, video_seed
from hparray.report.stats import compare, estimate
from hparray.runners import Clip, Generation, Hyperparams
from hparray.runners.ltx import DEMO_WEIGHTS_DIR, LTXRunner
from hparray.runners.ltx.model import MANIFEST, build_tiny_pipeline
from hparray.videos import read_video

TRIVIAL, RANDOM, NO_FINETUNE = "trivial (last frame)", "random init", "trained, no fine-tune"


def _lr_arm(lr: float, steps: int) -> str:
    return f"trained, lr {lr:g} x {steps} steps"


def _runner(settings: Any, path: str | None) -> LTXRunner:
    runner = LTXRunner(settings.runner, {**settings.model, "path": path}, "cpu")
    runner.load()
    return runner


def _by_video(scores: dict[str, dict[str, dict[str, float]]], arm: str, metric: str) -> dict[str, float]:
    return {video: s[metric] for video, s in scores.get(arm, {}).items()}


def _summary(scores: dict[str, dict[str, dict[str, float]]], metrics: list[str]) -> dict[str, Any]:
    """Per arm and metric: mean with CI, and the paired difference from the un-fine-tuned model,
    computed exactly as `hparray report` computes them."""
    out: dict[str, Any] = {}
    for arm in scores:
        out[arm] = {}
        for metric in metrics:
            values = _by_video(scores, arm, metric)
            est = estimate(values)
            entry: dict[str, Any] = {
                "n": est.n, "mean": est.mean, "std": est.std, "ci": [est.ci_low, est.ci_high]
            }
            if arm != NO_FINETUNE:
                cmp = compare(metric, values, _by_video(scores, NO_FINETUNE, metric), NO_FINETUNE)
                if cmp.pairs:
                    entry["vs_no_finetune"] = {
                        "mean_diff": cmp.mean_diff, "ci": [cmp.ci_low, cmp.ci_high], "p": cmp.p_value,
                        "improved": cmp.improved, "worse": cmp.worse,
                    }
            out[arm][metric] = entry
    return out


def _overlap(summary: dict[str, Any], a: str, b: str, metric: str) -> bool | None:
    """Whether two arms' CIs of the mean overlap (None when an arm is missing)."""
    if a not in summary or b not in summary:
        return None
    (lo_a, hi_a), (lo_b, hi_b) = summary[a][metric]["ci"], summary[b][metric]["ci"]
    return bool(lo_a <= hi_b and lo_b <= hi_a)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-dir", type=Path, default=REPO / "configs")
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS_DIR,
                        help="trained model folder (default: the shipped one)")
    parser.add_argument("--lrs", default=None,
                        help="fine-tuning learning rates, comma-separated (default: configs/lr_search.yaml)")
    parser.add_argument("--videos", type=int, default=None,
                        help="first N of the demo's videos (default: all of data.num_videos)")
    parser.add_argument("--name", default="demo_model", help="bench/out/<name>.json")
    args = parser.parse_args(argv)

    import torch
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()  # save_pretrained's note that there is no text encoder
    info = machine()
    settings = load_settings(args.config_dir)
    base = settings.baseline
    cf, steps = base.condition_frames, base.finetune_steps
    lrs = ([float(x) for x in args.lrs.split(",") if x] if args.lrs is not None
           else [float(v) for v in load_sweep(args.config_dir).searches["lr"].values])
    videos = select_videos(settings)[: args.videos]
    lpips = lpips_weights_status()
    metrics = ["psnr", "ssim"] + (["lpips"] if lpips.genuine else [])
    scorer = Scorer(metrics)
    manifest_path = args.weights / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    console.print(
        f"{len(videos)} held-out sample videos, {settings.data.num_frames} frames "
        f"{settings.data.height}x{settings.data.width}, condition_frames {cf}, "
        f"{settings.model.inference_steps} inference steps, fine-tune {settings.model.finetune}"
        + ("" if lpips.genuine else "; LPIPS skipped: the genuine AlexNet weights are not here")
    )

    arms = [TRIVIAL, RANDOM, NO_FINETUNE] + [_lr_arm(lr, steps) for lr in lrs]
    scores: dict[str, dict[str, dict[str, float]]] = {arm: {} for arm in arms}
    diverged: dict[str, list[str]] = {arm: [] for arm in arms}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu_seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        build_tiny_pipeline(None).save_pretrained(scratch)
        random_runner = _runner(settings, scratch)
        trained = _runner(settings, str(args.weights))
        for n, ref in enumerate(videos, 1):
            frames = read_video(ref.path, settings.data.num_frames, settings.data.height,
                                settings.data.width)
            clip = Clip.conditioned(ref, frames, cf)
            seed = task_seed(settings.seed, video_seed(ref.name))
            runs: list[tuple[str, Any]] = [
                (TRIVIAL, lambda: Generation(frames=trivial_prediction(frames, cf))),
                (RANDOM, lambda: random_runner.baseline(clip, cf, seed)),
                (NO_FINETUNE, lambda: trained.baseline(clip, cf, seed)),
            ] + [
                (_lr_arm(lr, steps),
                 lambda lr=lr: trained.finetune_and_generate(clip, Hyperparams(lr, cf, steps), seed))
                for lr in lrs
            ]
            for arm, run in runs:
                started, cpu = time.perf_counter(), time.process_time()
                generation = run()
                elapsed = time.perf_counter() - started
                seconds[arm].append(elapsed)
                cpu_seconds[arm].append(time.process_time() - cpu)
                row = {"video": ref.name, "category": ref.category, "arm": arm, "seconds": elapsed,
                       "cpu_seconds": cpu_seconds[arm][-1], "timings_s": generation.timings_s,
                       "diverged": generation.diverged}
                if generation.frames is None:
                    diverged[arm].append(ref.name)
                else:
                    row.update(scorer.score(generation.frames, frames, cf))
                    scores[arm][ref.name] = {m: row[m] for m in metrics}
                rows.append(row)
            psnr = {arm: scores[arm].get(ref.name, {}).get("psnr", float("nan")) for arm in arms}
            console.print(f"{n:>2}/{len(videos)} {ref.name}: "
                          + ", ".join(f"{arm} {value:.2f}" for arm, value in psnr.items()))

    summary = _summary(scores, metrics)
    columns = ["model"] + [f"{m.upper()} mean [95% CI]" for m in metrics] + [
        "PSNR vs no fine-tune [95% CI]", "better/worse", "s/task (CPU s)"]
    lines = []
    for arm in arms:
        cells = [arm]
        for metric in metrics:
            s = summary[arm][metric]
            cells.append(f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]" if s["n"] else "-")
        paired = summary[arm]["psnr"].get("vs_no_finetune")
        cells.append(f"{paired['mean_diff']:+.3f} [{paired['ci'][0]:+.3f}, {paired['ci'][1]:+.3f}]"
                     if paired else "")
        cells.append(f"{paired['improved']}/{paired['worse']}" if paired else "")
        cells.append(f"{np.mean(seconds[arm]):.2f} ({np.mean(cpu_seconds[arm]):.2f})")
        lines.append(cells)
    caption = (f"{len(videos)} videos; diverged: "
               + (", ".join(f"{a} {len(v)}" for a, v in diverged.items() if v) or "none")
               + "; " + load_line(info))
    console.print(table("Demo model on held-out sample videos", columns, lines, caption=caption))

    trained_minus_random = summary[NO_FINETUNE]["psnr"]["mean"] - summary[RANDOM]["psnr"]["mean"]
    checks: dict[str, Any] = {"trained_minus_random_psnr_db": trained_minus_random}
    console.print(f"trained - random init: {trained_minus_random:+.2f} dB PSNR (acceptance: >= 3 dB)")
    lr_arms = [_lr_arm(lr, steps) for lr in lrs]
    means = {arm: summary[arm]["psnr"]["mean"] for arm in lr_arms if summary[arm]["psnr"]["n"]}
    if len(means) >= 2:
        best, worst = max(means, key=means.__getitem__), min(means, key=means.__getitem__)
        cmp = compare("psnr", _by_video(scores, best, "psnr"), _by_video(scores, worst, "psnr"), worst)
        checks["lr_best_worst"] = [best, worst]
        checks["lr_best_minus_worst_psnr_db"] = cmp.mean_diff
        checks["lr_best_minus_worst_paired_ci"] = [cmp.ci_low, cmp.ci_high]
        checks["lr_best_worst_paired_ci_excludes_0"] = cmp.ci_low is not None and cmp.ci_low > 0
        checks["lr_best_worst_mean_cis_overlap"] = _overlap(summary, best, worst, "psnr")
        console.print(
            f"lr search: best {best} minus worst {worst}: {cmp.mean_diff:+.2f} dB PSNR, paired 95% CI "
            f"[{cmp.ci_low:+.2f}, {cmp.ci_high:+.2f}], Wilcoxon p={cmp.p_value:.2g} (CI excludes 0: "
            f"{checks['lr_best_worst_paired_ci_excludes_0']}); their means' own CIs overlap: "
            f"{checks['lr_best_worst_mean_cis_overlap']}"
            if cmp.ci_low is not None else f"lr search: best {best}, worst {worst}; too few videos for a CI")
    path = write_json(
        args.name, info, rows,
        settings={"videos": [v.name for v in videos], "condition_frames": cf, "finetune_steps": steps,
                  "lrs": lrs, "model": settings.model, "seed": settings.seed},
        weights={"dir": str(args.weights), "files": manifest.get("files"),
                 "settings": manifest.get("settings")},
        lpips={"scored": lpips.genuine, "sha256_prefix": lpips.sha256_prefix},
        summary=summary, checks=checks,
        seconds_per_task={arm: float(np.mean(v)) for arm, v in seconds.items()},
        cpu_seconds_per_task={arm: float(np.mean(v)) for arm, v in cpu_seconds.items()},
    )
    console.print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
