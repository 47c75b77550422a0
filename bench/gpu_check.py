"""One command for a GPU machine: LTX-Video's 2 B architecture (random weights) at the seed's
geometry through the `ltx` runner's own code, in the four precisions a sweep may use.

    python -m bench.gpu_check                # writes gpu_check.json and gpu_check.md to $OUT or bench/out

For full and LoRA fine-tuning, each in fp32 and in bf16 compute with fp32 master weights (plus
full bf16 with gradient checkpointing), it loads the checkpoint with `LTXRunner`, encodes a caption
with the text encoder off the GPU afterwards, runs a warm-up row, then a timed row of `--steps`
fine-tuning steps and `--inference-steps` sampling steps, and a baseline row. It reports seconds
per fine-tune step, inference seconds, peak GPU memory (max_memory_allocated) next to the
runner's estimate, and finishes within 8 minutes on one H200 (`--budget-s` skips what would not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "full-fp32": {"finetune": "full", "dtype": "float32"},
    "full-bf16-master": {"finetune": "full", "dtype": "bfloat16"},
    "full-bf16-master-ckpt": {"finetune": "full", "dtype": "bfloat16", "gradient_checkpointing": True},
    "lora-fp32": {"finetune": "lora", "dtype": "float32"},
    "lora-bf16-master": {"finetune": "lora", "dtype": "bfloat16"},
}


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| config | s / fine-tune step | inference s | baseline inference s "
             "| peak GiB (fine-tune row) | estimate GiB | peak / estimate | peak GiB (baseline) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['error']} | | | | | | |")
            continue
        fine, est = row["finetune"], row["estimate_gib"]["finetune_peak"]
        lines.append(f"| {row['name']} | {fine['s_per_step']:.3f} | {fine['inference_s']:.2f} | "
                     f"{row['baseline']['inference_s']:.2f} | {fine['peak_gib']:.2f} | {est:.2f} | "
                     f"{fine['peak_gib'] / est:.2f} | {row['baseline']['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import torch

    from bench.ltx_2b import run_config, save_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=352, help="the seed's 360p, to LTX's multiple of 32")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--condition-frames", type=int, default=22)
    parser.add_argument("--steps", type=int, default=3, help="timed fine-tuning steps")
    parser.add_argument("--inference-steps", type=int, default=8)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new config after this")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/out"))
    parser.add_argument("--device", default="cuda",
                        help="cpu: a smoke run of this script's path, no figures; it keeps the sizes given, so pass "
                             "small ones, e.g. --device cpu --height 64 --width 64 --frames 9 --condition-frames 5 "
                             "--configs lora-fp32,lora-bf16-master")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; on the CPU run `python -m bench.bench_ltx_2b`")
    started = time.perf_counter()
    where = "CPU (smoke run)"
    if args.device.startswith("cuda"):
        gpu = torch.cuda.get_device_properties(0)
        where = f"{gpu.name}, {gpu.total_memory / 2**30:.0f} GiB"
    header = (f"gpu_check: {where}, torch {torch.__version__}; "
              f"{args.frames}x{args.height}x{args.width}, {args.condition_frames} conditioning frames, "
              f"{args.steps} steps, {args.inference_steps} inference steps")
    print(header, flush=True)
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hparray-gpu-check-") as tmp:
        folder = Path(tmp) / "ltx-2b-random"
        saved = save_random_checkpoint(folder)
        print(f"checkpoint built in {saved['build_s']:.0f} s, saved in {saved['save_s']:.0f} s", flush=True)
        for name in args.configs.split(","):
            if time.perf_counter() - started > args.budget_s:
                rows.append({"name": name, "error": f"skipped: past --budget-s {args.budget_s:.0f}"})
                continue
            model = {**CONFIGS[name], "inference_steps": args.inference_steps}
            begin = time.perf_counter()
            try:
                row = run_config(folder, args.device, model, height=args.height, width=args.width,
                                 num_frames=args.frames, condition_frames=args.condition_frames, steps=args.steps,
                                 warmup_steps=1)
                rows.append({"name": name, **row, "wall_s": time.perf_counter() - begin})
            except Exception as err:  # out of memory and the like: recorded, and the next config runs
                rows.append({"name": name, "error": f"{type(err).__name__}: {str(err)[:200]}",
                             "traceback": traceback.format_exc()})
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(markdown(rows[-1:], name), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"header": header, "checkpoint": saved, "rows": rows,
                                                         "total_s": time.perf_counter() - started},
                                                        indent=2, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(rows, header))
    print(markdown(rows, header))
    print(f"done in {time.perf_counter() - started:.0f} s; wrote {args.out}/gpu_check.json and gpu_check.md")


if __name__ == "__main__":
    main()
