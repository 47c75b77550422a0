"""The built-in tiny LTX-Video as a resident server: the reference for wrapping a model, and the
proof that the protocol loses nothing (it gives the in-process `ltx` runner's results exactly).

Run by the resident runner with hparray's own interpreter (it imports hparray's LTX code):

    runner:
      name: resident
      command: ["{python}", "{servers}/tiny_ltx.py", --inference-steps, "8"]

The flags mirror base.yaml's `model:` section; give the same values as the sweep's model section
for the same results as `runner.name: ltx`.
"""

from __future__ import annotations

import argparse

import hparray_serve as hs


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None, help="an LTX-Video checkpoint folder (default: the built-in model)")
    parser.add_argument("--finetune", default="full", choices=("full", "lora"))
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--inference-steps", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--frame-rate", type=int, default=25)
    return parser.parse_args()


def main() -> None:
    args = parse()
    model = {"path": args.path, "finetune": args.finetune, "lora_rank": args.lora_rank,
             "inference_steps": args.inference_steps, "guidance_scale": args.guidance_scale, "dtype": args.dtype,
             "frame_rate": args.frame_rate}
    state: dict = {}

    def identity() -> str:  # cheap: no torch; names the weights, as the in-process runner does
        from hparray.runners.ltx.model import builtin_model_id

        return f"tiny-ltx:{args.path or builtin_model_id()}"

    def load() -> None:
        import os

        from hparray.runners.ltx import LTXRunner

        state["runner"] = LTXRunner({}, model, os.environ.get("HPARRAY_DEVICE", "cpu"))
        state["runner"].load()

    def clip_of(task: hs.Task):  # what the in-process runner is given: the conditioning frames
        from hparray.runners import Clip
        from hparray.videos import VideoRef

        return Clip(VideoRef(task.video, "", "", task.caption), task.read_condition_array(), task.num_frames)

    def reply(generation, task: hs.Task) -> hs.Reply:
        if not generation.diverged:
            task.write_output(generation.frames)
        return hs.Reply(finetune_s=generation.timings_s.get("finetune", 0.0),
                        inference_s=generation.timings_s.get("inference", 0.0),
                        peak_memory_mb=generation.peak_memory_mb, diverged=generation.diverged,
                        notes=generation.notes)

    def baseline(task: hs.Task) -> hs.Reply:
        return reply(state["runner"].baseline(clip_of(task), task.condition_frames, task.seed), task)

    def finetune_and_generate(task: hs.Task) -> hs.Reply:
        from hparray.runners import Hyperparams

        hp = Hyperparams(lr=float(task.lr), condition_frames=task.condition_frames, finetune_steps=task.finetune_steps)
        return reply(state["runner"].finetune_and_generate(clip_of(task), hp, task.seed), task)

    hs.serve(identity(), load=load, baseline=baseline, finetune_and_generate=finetune_and_generate)


if __name__ == "__main__":
    main()
