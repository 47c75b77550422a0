"""hparray as a user installs it: the wheel, non-editable, in a fresh venv without torch, used from
a folder outside the checkout (`hparray init`, plan, submit --local through a resident server on
the wheel's hparray_serve, status, report; a `command` runner configured in base.yaml; the example
configs); then the [ltx] extra is the one that brings torch in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_videos

REPO = Path(__file__).resolve().parents[2]
NETWORK_SIGNS = ("Temporary failure in name resolution", "Max retries exceeded", "Network is unreachable",
                 "No matching distribution found")

# The user's model as a resident server on the wheel's hparray_serve: the last conditioning
# frame repeated.
SERVER = textwrap.dedent(
    """
    import numpy as np
    import hparray_serve as hs

    def predict(task):
        condition = task.read_condition_array()
        rest = np.repeat(condition[-1:], task.num_frames - len(condition), axis=0)
        task.write_output(np.concatenate([condition, rest]))

    hs.serve("last-frame:v1", baseline=predict, finetune_and_generate=predict)
    """
)


def _run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPARRAY_DB", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HPARRAY_CACHE=str(cwd / ".cache"))
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the core wheel (and its dependencies at the tested versions), no torch."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(wheels), str(REPO)], root)
    assert built.returncode == 0, built.stderr
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    wheel = next(wheels.glob("hparray-*.whl"))
    installed = _run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), str(wheel)],
                     root, timeout=1800)
    if installed.returncode != 0 and any(sign in installed.stderr for sign in NETWORK_SIGNS):
        pytest.skip(f"the package registry cannot be reached: {installed.stderr.strip().splitlines()[-1]}")
    assert installed.returncode == 0, installed.stderr
    return env_dir


@pytest.mark.slow
def test_the_core_wheel_runs_a_sweep_outside_the_checkout_without_torch(core_venv: Path, tmp_path: Path) -> None:
    python, hparray = core_venv / "bin" / "python", core_venv / "bin" / "hparray"
    project = tmp_path / "my sweep"  # outside the checkout, with a space
    assert not project.resolve().is_relative_to(REPO)
    no_torch = _run([str(python), "-c", "import torch"], tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    project.mkdir()
    init = _run([str(hparray), "init"], project)
    assert init.returncode == 0, init.stderr
    assert sorted(p.name for p in (project / "configs").iterdir()) == [
        "base.yaml", "condition_frames_search.yaml", "lr_search.yaml", "steps_search.yaml"]
    shipped = (project / "configs" / "base.yaml").read_text()
    assert shipped == (REPO / "configs" / "base.yaml").read_text() and "#" in shipped  # commented

    # The starter base.yaml runs the built-in LTX-Video: without the [ltx] extra, plan says so.
    refused = _run([str(hparray), "plan", "--search", "lr"], project)
    assert refused.returncode == 2 and "hparray[ltx]" in refused.stderr, refused.stderr
    assert not (project / "results.db").exists()

    write_videos(project / "videos", categories=("pan", "zoom"), per_category=1, frames=30)
    (project / "serve.py").write_text(SERVER)
    servers = Path(_run([str(hparray), "servers"], project).stdout.strip())
    assert servers.is_relative_to(core_venv) and (servers / "hparray_serve.py").is_file()
    base = yaml.safe_load(shipped)
    base["data"].update(source="videos", num_videos=2, num_frames=30, height=32, width=32)
    base["baseline"]["condition_frames"] = 4
    base["runner"] = {"name": "resident", "command": ["{python}", str(project / "serve.py")]}
    base["metrics"] = ["psnr", "ssim"]
    (project / "configs" / "base.yaml").write_text(yaml.safe_dump(base))
    (project / "configs" / "lr_search.yaml").write_text(
        yaml.safe_dump({"search": "lr", "parameter": "lr", "values": [1e-5, 1e-4]}))

    for argv in (["plan", "--search", "lr"], ["submit", "--local", "--workers", "1"], ["status"],
                 ["report", "--out", str(project / "report")]):
        done = _run([str(hparray), *argv], project)
        assert done.returncode == 0, f"hparray {' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    state = json.loads(_run([str(hparray), "status", "--json"], project).stdout)
    assert (state["total"], state["done"]) == (6, 6), state  # 2 videos x (1 inference + 2 fine-tune)
    summary = json.loads((project / "report" / "summary.json").read_text())
    assert summary["metrics"] == ["psnr", "ssim"]
    assert (project / "report" / "report.html").is_file()


# The user's per-video script for the `command` runner, in the same torch-free venv: it reads the
# conditioning frames and writes the last one repeated as generated.npy.
SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np

    condition, out, frames = np.load(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rest = np.repeat(condition[-1:], frames - len(condition), axis=0)
    np.save(out / "generated.npy", np.concatenate([condition, rest]))
    """
)


@pytest.mark.slow
def test_the_core_wheel_runs_a_command_runner_sweep_configured_in_yaml(core_venv: Path, tmp_path: Path) -> None:
    """The command runner as users configure it (an argv list in base.yaml), from the wheel, no torch."""
    hparray = core_venv / "bin" / "hparray"
    project = tmp_path / "script sweep"
    project.mkdir()
    assert _run([str(hparray), "init"], project).returncode == 0
    write_videos(project / "videos", categories=("pan",), per_category=2, frames=30)
    (project / "predict.py").write_text(SCRIPT)
    base = yaml.safe_load((project / "configs" / "base.yaml").read_text())
    base["data"].update(source="videos", num_videos=2, num_frames=30, height=32, width=32)
    base["baseline"]["condition_frames"] = 4
    base["runner"] = {"name": "command", "timeout_s": 120, "command": [
        str(core_venv / "bin" / "python"), str(project / "predict.py"), "{condition_video}", "{output_dir}",
        "{num_frames}"]}
    base["metrics"] = ["psnr", "ssim"]
    (project / "configs" / "base.yaml").write_text(yaml.safe_dump(base))
    (project / "configs" / "lr_search.yaml").write_text(
        yaml.safe_dump({"search": "lr", "parameter": "lr", "values": [1e-5]}))
    for argv in (["plan", "--search", "lr"], ["submit", "--local", "--workers", "1"]):
        done = _run([str(hparray), *argv], project)
        assert done.returncode == 0, f"hparray {' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    state = json.loads(_run([str(hparray), "status", "--json"], project).stdout)
    assert (state["total"], state["done"]) == (4, 4), state
    report = _run([str(hparray), "report", "--out", str(project / "report")], project)
    assert report.returncode == 0, report.stderr
    assert json.loads((project / "report" / "summary.json").read_text())["metrics"] == ["psnr", "ssim"]


@pytest.mark.slow
def test_the_wheel_ships_the_example_configs(core_venv: Path, tmp_path: Path) -> None:
    """`hparray init --example opensora_v1_3` from the wheel writes the Open-Sora starter config."""
    done = _run([str(core_venv / "bin" / "hparray"), "init", "--example", "opensora_v1_3"], tmp_path)
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "configs" / "base.yaml").read_text()
    assert written == (REPO / "configs" / "examples" / "opensora_v1_3.yaml").read_text()


@pytest.mark.slow
def test_the_ltx_extra_brings_torch_in(core_venv: Path, tmp_path: Path) -> None:
    """What pip would install for hparray[ltx] (resolved, not downloaded: a dry run)."""
    python = core_venv / "bin" / "python"
    wheel = next((core_venv.parent / "wheels").glob("hparray-*.whl"))
    report = tmp_path / "report.json"
    resolved = _run([str(python), "-m", "pip", "install", "--dry-run", "-q", "--report", str(report),
                     "-c", str(REPO / "constraints.txt"), f"hparray[ltx] @ {wheel.as_uri()}"], tmp_path, timeout=1800)
    if resolved.returncode != 0 and any(sign in resolved.stderr for sign in NETWORK_SIGNS):
        pytest.skip(f"the package registry cannot be reached: {resolved.stderr.strip().splitlines()[-1]}")
    assert resolved.returncode == 0, resolved.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"torch", "diffusers", "peft"} <= names, sorted(names)
