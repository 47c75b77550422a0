"""LTX-Video's published 2 B architecture on the CPU, through the `ltx` runner's own code.

Random weights (diffusers' 2 B transformer and the 0.9.5 VAE, bf16, with a tiny T5 of width
4096 as text encoder), saved as a diffusers checkpoint and loaded by `LTXRunner` with LoRA, bf16
compute and fp32 adapters: one fine-tune step and one inference step at a small geometry (the
default 96x96, 17 frames, 9 conditioning frames), then one baseline inference. It prints the
times, the peak RSS of each phase, and the bytes of the weights, gradients and AdamW state
measured at the optimizer step next to the runner's memory estimate for the same row. Slow (a
few minutes) and about 10 GiB of memory: a bench, not a test. The GPU version is gpu_check.py.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from bench.common import REPO, console, load_line, machine, table, write_json
    from bench.ltx_2b import run_config, save_random_checkpoint, threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--condition-frames", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    threads(args.threads)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="hparray-ltx2b-") as tmp:
        folder = Path(tmp) / "ltx-2b-random"
        console.print("building and saving the 2 B transformer, the 0.9.5 VAE and a tiny T5 (bf16) ...")
        saved = save_random_checkpoint(folder)
        console.print(f"built in {saved['build_s']:.1f} s, saved in {saved['save_s']:.1f} s; running a LoRA row ...")
        model = {"finetune": "lora", "dtype": "bfloat16", "inference_steps": 1, "lora_rank": 8}
        result = run_config(folder, "cpu", model, height=args.height, width=args.width, num_frames=args.frames,
                            condition_frames=args.condition_frames, steps=1)
    fine, base = result["finetune"], result["baseline"]
    console.print(table(
        f"LTX-Video 2 B (random weights) on the CPU, LoRA r8, bf16 compute + fp32 adapters, "
        f"{args.frames}x{args.height}x{args.width}, {args.condition_frames} conditioning frames",
        ["phase", "seconds", "peak RSS GiB"],
        [["build + save the checkpoint", f"{saved['build_s'] + saved['save_s']:.1f}", ""],
         ["load + encode the caption + place", f"{result['load_s']:.1f}",
          f"{result['load_peak_gib']:.2f} ({result['rss_after_load_gib']:.2f} after)"],
         ["fine-tune, 1 step", f"{fine['finetune_s']:.2f}", f"{fine['peak_gib']:.2f}"],
         ["inference, 1 step (after fine-tuning)", f"{fine['inference_s']:.2f}", ""],
         ["baseline inference, 1 step", f"{base['inference_s']:.2f}", f"{base['peak_gib']:.2f}"]],
        caption=load_line(info)))
    measured, estimated = result["measured_bytes_gib"], result["estimate_gib"]
    rows = [[name, f"{measured[name]:.4f}", f"{estimated.get(name, 0.0):.4f}",
             f"{estimated.get(name, 0.0) / measured[name]:.3f}" if measured[name] else "-"] for name in measured]
    console.print(table("Estimate vs bytes at the optimizer step (GiB)", ["part", "measured", "estimated", "ratio"],
                        rows))
    path = write_json("ltx_2b_cpu", info, [result], checkpoint=saved, settings=vars(args))
    console.print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
