"""The `command` runner as users configure it: in configs/base.yaml, through the CLI, end to end."""

from __future__ import annotations

import json
import sys
import textwrap

from tests.conftest import Project

# A per-video script: the last conditioning frame repeated (reads the placeholders it is given).
SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np

    video, output_dir, cond = sys.argv[1], sys.argv[2], int(sys.argv[3])
    frames = np.load(video)
    frames[cond:] = frames[cond - 1]
    np.save(output_dir + "/generated.npy", frames)
    """
)


def test_a_sweep_with_the_command_runner_configured_in_base_yaml_completes(make_project) -> None:
    project: Project = make_project(lr_values=[1e-5, 1e-4], per_category=1)
    script = project.root / "predict.py"
    script.write_text(SCRIPT)
    base = project.base()
    base["runner"] = {"name": "command", "timeout_s": 60,
                      "command": [sys.executable, str(script), "{video}", "{output_dir}", "{condition_frames}"]}
    base["metrics"] = ["psnr", "ssim"]
    project.write_base(base)

    planned = project.run("plan", "--search", "lr")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    ran = project.run("submit", "--local", "--workers", "1", timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    status = project.run("status", "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["total"] == 6 and state["done"] == 6, state  # 2 videos x (1 inference + 2 fine-tune)
    assert state["failed"] == 0
