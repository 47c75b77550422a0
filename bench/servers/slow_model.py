"""A stand-in for a big model, for bench_server: loading takes LOAD_S seconds and allocates
ALLOC_MB of memory (sleep plus touched pages, as reading weights does), each task takes TASK_S
seconds and predicts the last conditioning frame repeated.

The same file runs both ways:
  resident   python slow_model.py --serve                    (through hparray_serve, loads once)
  command    python slow_model.py CONDITION.npy NUM_FRAMES OUTPUT_DIR   (loads on every call)
Needs numpy only.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

LOAD_S = float(os.environ.get("SLOW_MODEL_LOAD_S", "5"))
ALLOC_MB = int(os.environ.get("SLOW_MODEL_ALLOC_MB", "300"))
TASK_S = float(os.environ.get("SLOW_MODEL_TASK_S", "0.5"))
WEIGHTS: list[np.ndarray] = []


def load() -> None:
    started = time.perf_counter()
    WEIGHTS.append(np.ones(ALLOC_MB * 2**20 // 8))  # touches every page, as loading weights does
    time.sleep(max(0.0, LOAD_S - (time.perf_counter() - started)))


def predict(condition: np.ndarray, num_frames: int) -> np.ndarray:
    time.sleep(TASK_S)
    return np.concatenate([condition, np.repeat(condition[-1:], num_frames - len(condition), axis=0)])


def main(argv: list[str]) -> None:
    if argv == ["--serve"]:
        import hparray_serve as hs

        def task(request: hs.Task) -> None:
            request.write_output(predict(request.read_condition_array(), request.num_frames))

        hs.serve(f"slow-model:load{LOAD_S:g}s-task{TASK_S:g}s", load=load, baseline=task,
                 finetune_and_generate=task)
        return
    condition, num_frames, output_dir = argv
    load()
    np.save(os.path.join(output_dir, "generated.npy"), predict(np.load(condition), int(num_frames)))


if __name__ == "__main__":
    main(sys.argv[1:])
