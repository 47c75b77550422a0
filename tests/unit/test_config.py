"""Config loading: the shipped grid, YAML 1.1 numbers, and one clear message per mistake."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from hparray.config import format_value, load_sweep
from hparray.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_shipped_configs_reproduce_the_grid() -> None:
    sweep = load_sweep(REPO_CONFIGS)
    base = sweep.settings.baseline
    assert (base.lr, base.condition_frames, base.finetune_steps) == (1e-5, 22, 20)
    assert sweep.settings.data.num_videos == 20
    assert sweep.searches["lr"].values == (1e-6, 5e-6, 1e-5, 5e-5, 1e-4)
    assert sweep.searches["condition_frames"].values == (5, 11, 17, 22, 28)
    assert sweep.searches["steps"].values == (5, 10, 20, 40, 80)
    assert all(isinstance(v, float) for v in sweep.searches["lr"].values)


@pytest.mark.parametrize("value, name", [(1e-6, "1e-6"), (5e-5, "5e-5"), (1e-4, "1e-4"), (2.5e-5, "2.5e-5"),
                                         (22, "22"), (0.1, "1e-1")])
def test_config_names_in_the_seed_style(value: float, name: str) -> None:
    assert format_value(value) == name


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "configs"
    shutil.copytree(REPO_CONFIGS, target)
    return target


def test_scientific_notation_without_a_dot_is_a_number(tmp_path: Path) -> None:
    configs = _copy(tmp_path)
    text = (configs / "base.yaml").read_text().replace("lr: 1e-5", "lr: 3e-5")
    (configs / "base.yaml").write_text(text)
    assert load_sweep(configs).settings.baseline.lr == 3e-5
    # PyYAML alone would have read a string: the loader is what makes it a number.
    assert isinstance(yaml.safe_load("lr: 3e-5")["lr"], str)


def _edit(configs: Path, file: str, section: str | None, key: str, value: object) -> None:
    path = configs / file
    data = yaml.safe_load(path.read_text())
    target = data[section] if section else data
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("file, section, key, value, expected", [
    ("base.yaml", "data", "num_vidoes", 20, "did you mean data.num_videos"),
    ("base.yaml", "data", "num_videos", "twenty", "data.num_videos must be an integer"),
    ("base.yaml", "baseline", "lr", -1e-5, "baseline.lr must be > 0"),
    ("base.yaml", "baseline", "lr", 0, "baseline.lr must be > 0"),
    ("base.yaml", "baseline", "finetune_steps", -1, "baseline.finetune_steps must be >= 0"),
    ("base.yaml", "baseline", "condition_frames", 49, "baseline.condition_frames is 49 but videos have"),
    ("base.yaml", "data", "height", 50, "multiple of 32"),
    ("base.yaml", None, "metrics", ["psnr", "fid"], "metrics contains 'fid'"),
    ("base.yaml", "slurm", "time", "four hours", "slurm.time is not a Slurm time"),
    ("base.yaml", "model", "finetune", "half", "model.finetune must be 'full' or 'lora'"),
    ("base.yaml", "baseline", "lr", KeyError, "baseline.lr is missing"),
    ("lr_search.yaml", None, "values", [], "values is empty"),
    ("lr_search.yaml", None, "values", [1e-5, -1e-4], "values[1] is -0.0001; a learning rate must be > 0"),
    ("lr_search.yaml", None, "values", [1e-5, 1e-5], "values[1] repeats"),
    ("steps_search.yaml", None, "values", [5, -10], "values[1] is -10; steps cannot be negative"),
    ("condition_frames_search.yaml", None, "values", [5, 60], "values[1] is 60 but videos have data.num_frames 49"),
    ("lr_search.yaml", None, "parameter", "momentum", "which the baseline in base.yaml does not have"),
    ("lr_search.yaml", None, "values", ["fast"], "values[0] must be a number"),
])
def test_each_mistake_gets_one_message_naming_file_key_and_fix(
        tmp_path: Path, file: str, section: str | None, key: str, value: object, expected: str) -> None:
    configs = _copy(tmp_path)
    _edit(configs, file, section, key, value)
    with pytest.raises(ConfigError) as caught:
        load_sweep(configs)
    message = str(caught.value)
    assert expected in message
    assert file in message
    assert "\n" not in message
    assert ":" in message.split(file, 1)[1]  # "file: key problem: fix"


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    configs = _copy(tmp_path)
    (configs / "base.yaml").write_text("seed: 0\nbaseline:\n  lr: [1e-5\n")
    with pytest.raises(ConfigError, match=r"base.yaml: line \d+ is not valid YAML"):
        load_sweep(configs)


def test_missing_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config-dir"):
        load_sweep(tmp_path / "nope")


def test_frame_sizes_are_the_runners_business(tmp_path: Path) -> None:
    """LTX-Video's multiple-of-32 rule is the ltx runner's; Open-Sora's 360x640 plans with a resident server."""
    configs = _copy(tmp_path)
    data = yaml.safe_load((configs / "base.yaml").read_text())
    data["data"].update(height=360, width=640)
    (configs / "base.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"data.height must be a positive multiple of 32, got 360: LTX-Video"):
        load_sweep(configs)
    data["runner"] = {"name": "resident", "command": ["/envs/opensora/bin/python", "serve.py"]}
    (configs / "base.yaml").write_text(yaml.safe_dump(data))
    settings = load_sweep(configs).settings
    assert (settings.data.height, settings.data.width) == (360, 640)
