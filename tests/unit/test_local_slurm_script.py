"""The test cluster's own script (tests/slurm/): its defaults must describe the machine it runs on."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "start-local-slurm.sh"


def test_the_cpu_count_ignores_omp_num_threads() -> None:
    """`nproc` follows OMP_NUM_THREADS (which tests set to 1): the cluster came up with one CPU."""
    line = next(line for line in SCRIPT.read_text().splitlines() if re.match(r"CPUS=", line))
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_SLURM_CPUS"} | {"OMP_NUM_THREADS": "1"}
    evaluated = subprocess.run(["bash", "-c", f"{line}; echo $CPUS"], capture_output=True, text=True, env=env)
    every = subprocess.run(["nproc", "--all"], capture_output=True, text=True)
    assert evaluated.stdout.strip() == every.stdout.strip(), line
