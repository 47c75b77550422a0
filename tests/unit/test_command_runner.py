"""CommandRunner driving real external scripts: no shell, real files, real timeouts and kills."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from hparray.errors import ConfigError, RunnerError
from hparray.runners import Clip, Hyperparams, runner_class
from hparray.runners.command import CommandRunner
from hparray.videos import VideoRef

T, H, W = 9, 32, 48

# The user's per-video script. It records what it was given into argv[1] (outside its
# output_dir, which hparray deletes after each task), then acts as told by argv[2].
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np

    record, mode, video, output_dir, lr, cond, steps, seed = sys.argv[1:9]
    with open(record, "w") as fh:
        json.dump({"argv": sys.argv[1:], "device": os.environ.get("HPARRAY_DEVICE")}, fh)
    frames = np.load(video)
    out = os.path.join(output_dir, "generated.npy")
    if mode == "copy":
        np.save(out, frames)
    elif mode == "float":
        pred = frames.astype(np.float32) / 255.0
        pred[int(cond):] = pred[int(cond) - 1]
        np.save(out, np.concatenate([pred, pred[:3]]))  # longer than the clip: cropped
        with open(os.path.join(output_dir, "timings.json"), "w") as fh:
            json.dump({"finetune_s": 1.5, "inference_s": 0.25}, fh)
    elif mode == "mp4":
        import av
        with av.open(os.path.join(output_dir, "generated.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = 4_000_000
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    elif mode == "nan":
        np.save(out, np.full(frames.shape, np.nan, dtype=np.float32))
    elif mode == "small":
        np.save(out, frames[:, :16])
    elif mode == "fail":
        for i in range(30):
            print(f"stderr line {i}", file=sys.stderr)
        sys.exit(3)
    elif mode == "sleep":
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("going to sleep", file=sys.stderr, flush=True)
        with open(record + ".tmp", "w") as fh:  # renamed: the test sees the whole pid or nothing
            fh.write(str(child.pid))
        os.rename(record + ".tmp", record + ".child")
        time.sleep(600)
    # mode "nothing": exits 0 without output
    """
)


def clip_frames() -> np.ndarray:
    frames = np.zeros((T, H, W, 3), dtype=np.uint8)
    for t in range(T):
        frames[t, ..., 0] = 20 + 20 * t
        frames[t, ..., 1] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
        frames[t, ..., 2] = 100
    return frames


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Clip]:
    script = tmp_path / "predict.py"
    script.write_text(SCRIPT)
    folder = tmp_path / "my videos; rm -rf ~ 'quoted' \"double\""
    folder.mkdir()
    video = folder / "clip one;$(echo x).npy"
    np.save(video, clip_frames())
    clip = Clip(
        ref=VideoRef(name="clip-one", path=str(video), category="pan"),
        frames=clip_frames().astype(np.float32)[:3] / 255.0,  # the conditioning frames (tests use 3)
        num_frames=T,
    )
    return script, tmp_path / "record.json", clip


def make_runner(script: Path, record: Path, mode: str, timeout_s: float = 60) -> CommandRunner:
    command = [
        sys.executable,
        str(script),
        str(record),
        mode,
        "{video}",
        "{output_dir}",
        "{lr}",
        "{condition_frames}",
        "{finetune_steps}",
        "{seed}",
    ]
    return CommandRunner({"name": "command", "command": command, "timeout_s": timeout_s}, {}, "cpu")


def test_registered_as_the_command_builtin() -> None:
    assert runner_class("command") is CommandRunner


def test_paths_with_spaces_quotes_and_semicolons_reach_the_script_intact(setup) -> None:
    script, record, clip = setup
    result = make_runner(script, record, "copy").finetune_and_generate(
        clip, Hyperparams(lr=3e-5, condition_frames=4, finetune_steps=12), seed=99
    )
    seen = json.loads(record.read_text())
    assert seen["argv"][2] == clip.ref.path
    assert seen["argv"][4:] == ["3e-05", "4", "12", "99"]
    assert seen["device"] == "cpu"
    output_dir = Path(seen["argv"][3])
    assert (
        output_dir.name.startswith("hparray-task-") and not output_dir.exists()
    )  # fresh, then removed
    assert result.frames is not None and result.frames.dtype == np.float32
    np.testing.assert_allclose(result.frames, clip_frames().astype(np.float32) / 255.0, atol=1e-7)  # uint8 -> /255
    assert not result.diverged
    assert result.timings_s["finetune"] == 0.0 and result.timings_s["inference"] > 0
    assert result.peak_memory_mb > 10  # the child's own RSS: python + numpy


def test_baseline_substitutes_zero_lr_and_steps(setup) -> None:
    script, record, clip = setup
    make_runner(script, record, "copy").baseline(clip, condition_frames=5, seed=7)
    assert json.loads(record.read_text())["argv"][4:] == ["0", "5", "0", "7"]


def test_float_output_is_cropped_and_its_timings_are_used(setup) -> None:
    script, record, clip = setup
    result = make_runner(script, record, "float").baseline(clip, condition_frames=3, seed=0)
    assert result.frames.shape == (T, H, W, 3)
    np.testing.assert_array_equal(
        result.frames[3:], np.broadcast_to(clip.frames[2], (T - 3, H, W, 3))
    )
    assert result.timings_s == {"load": 0.0, "finetune": 1.5, "inference": 0.25}


def test_mp4_output_is_decoded(setup) -> None:
    script, record, clip = setup
    result = make_runner(script, record, "mp4").baseline(clip, condition_frames=3, seed=0)
    assert result.frames.shape == (T, H, W, 3) and result.frames.dtype == np.float32
    assert np.abs(result.frames - clip_frames().astype(np.float32) / 255.0).mean() < 0.05  # lossy codec


def test_nan_output_is_a_divergence_not_an_error(setup) -> None:
    script, record, clip = setup
    result = make_runner(script, record, "nan").baseline(clip, condition_frames=3, seed=0)
    assert result.diverged and result.frames is None


def test_wrong_size_or_missing_output_is_an_error(setup) -> None:
    script, record, clip = setup
    with pytest.raises(RunnerError, match="16x48, the video clip-one has 32x48"):
        make_runner(script, record, "small").baseline(clip, condition_frames=3, seed=0)
    with pytest.raises(RunnerError, match=r"wrote neither generated\.npy nor generated\.mp4"):
        make_runner(script, record, "nothing").baseline(clip, condition_frames=3, seed=0)


def test_failing_script_reports_exit_code_and_stderr_tail(setup) -> None:
    script, record, clip = setup
    with pytest.raises(RunnerError) as info:
        make_runner(script, record, "fail").baseline(clip, condition_frames=3, seed=0)
    message = str(info.value)
    assert "exited with code 3" in message
    assert "stderr line 29" in message and "stderr line 10" in message
    assert "stderr line 9\n" not in message  # only the last 20 lines


def test_timeout_kills_the_whole_process_group(setup) -> None:
    """The runner's clock is driven by the script's progress: its time is up once the script has
    started its own child and said so, however long that took on this machine."""
    script, record, clip = setup
    started = Path(str(record) + ".child")
    runner = make_runner(script, record, "sleep", timeout_s=2)
    runner.clock = lambda: 1e9 if started.exists() else 0.0
    with pytest.raises(RunnerError, match=r"timed out after 2 s(.|\n)*going to sleep"):
        runner.baseline(clip, condition_frames=3, seed=0)
    child = int(started.read_text())
    deadline = time.monotonic() + 60
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the script's own child outlived the timeout"
        time.sleep(0.05)


def test_command_settings_are_validated() -> None:
    def build(command: object, timeout_s: object = 10) -> CommandRunner:
        return CommandRunner({"command": command, "timeout_s": timeout_s}, {}, "cpu")

    with pytest.raises(ConfigError, match=r"unknown placeholder \{videos\}"):
        build(["predict", "{videos}"])
    with pytest.raises(ConfigError, match="non-empty list of strings"):
        build([])
    with pytest.raises(ConfigError, match="non-empty list of strings"):
        build("python predict.py {video}")
    with pytest.raises(ConfigError, match="non-empty list of strings"):
        build(["python", 3])
    with pytest.raises(ConfigError, match="literal braces"):
        build(["python", "{video"])
    with pytest.raises(ConfigError, match=r"runner\.command element"):
        build(["python", "{video:d}"])
    with pytest.raises(ConfigError, match="timeout_s"):
        build(["python"], timeout_s=0)
    runner = build(["predict", "--lr={lr:.0e}", "{{literal}}", "{seed}"])
    assert runner.argv(
        {
            "lr": 1e-4,
            "seed": 3,
            "video": "v",
            "output_dir": "o",
            "condition_frames": 1,
            "finetune_steps": 0,
        }
    ) == ["predict", "--lr=1e-04", "{literal}", "3"]


def test_unstartable_command_is_a_runner_error(setup) -> None:
    _, _, clip = setup
    runner = CommandRunner({"command": [os.devnull + "-no-such-program", "{video}"]}, {}, "cpu")
    with pytest.raises(RunnerError, match="cannot start runner command"):
        runner.baseline(clip, condition_frames=3, seed=0)


CONDITION_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np

    condition, output_dir, num_frames, height, width, caption, record = sys.argv[1:8]
    frames = np.load(condition)
    with open(record, "w") as fh:
        json.dump({"shape": list(frames.shape), "dtype": str(frames.dtype), "caption": caption,
                   "geometry": [int(num_frames), int(height), int(width)]}, fh)
    rest = np.repeat(frames[-1:], int(num_frames) - len(frames), axis=0)
    np.save(output_dir + "/generated.npy", np.concatenate([frames, rest]))
    """
)


def test_condition_video_holds_exactly_the_conditioning_frames(setup, tmp_path: Path) -> None:
    """{condition_video}: the honest input, the first condition_frames frames and nothing after."""
    _, _, clip = setup
    script = tmp_path / "condition.py"
    script.write_text(CONDITION_SCRIPT)
    record = tmp_path / "seen.json"
    runner = CommandRunner({"name": "command", "timeout_s": 60, "command": [
        sys.executable, str(script), "{condition_video}", "{output_dir}", "{num_frames}", "{height}", "{width}",
        "{caption}", str(record)]}, {}, "cpu")
    result = runner.baseline(clip, condition_frames=3, seed=0)
    seen = json.loads(record.read_text())
    assert seen["shape"] == [3, H, W, 3] and seen["dtype"] == "float32" and seen["geometry"] == [T, H, W]
    assert result.frames is not None
    np.testing.assert_array_equal(result.frames[:3], clip.frames)
