"""hparray.slurm without a cluster: rendering, parsing Slurm's output, MaxArraySize splitting, and
the Slurm-aware reaper's decisions against a real database with a fake `squeue` on PATH (the only
fake: Slurm's client, at the edge)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hparray import slurm
from hparray.cli import cli
from hparray.config import SlurmSettings
from hparray.errors import BadInput, SlurmError
from hparray.status import StatusWithSlurm
from hparray.store import Store

SETTINGS = SlurmSettings(job_name="sweep", partition=None, account=None, qos=None, time="01:00:00", gpus_per_task=1,
                         cpus_per_task=4, mem_gb=16, constraint=None, extra_directives=(), setup=(), workers=8,
                         throttle=4, signal_grace_s=120, log_dir="logs/slurm")
def replace(settings: SlurmSettings, **changes: object) -> SlurmSettings:
    return settings.model_copy(update=changes)


GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "worker.sbatch"
COMMAND = ["/venv/bin/python", "-m", "hparray", "--config-dir", "/p/configs", "--db", "sqlite:////p/results.db",
           "worker"]


def render(settings: SlurmSettings = SETTINGS, **kwargs: object) -> str:
    args: dict[str, object] = {"array_size": 6, "throttle": 2, "worker_command": COMMAND, "workdir": Path("/p"),
                               "overrides": slurm.Overrides()}
    args.update(kwargs)
    return slurm.render_script(settings, **args)  # type: ignore[arg-type]


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


# ---------------------------------------------------------------- the golden script


def test_rendered_script_matches_the_golden_file() -> None:
    """After an intended change to sbatch/worker.sbatch.j2 or render_script, regenerate with
    `HPARRAY_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_slurm_unit.py -k golden`
    and review the diff of tests/golden/worker.sbatch."""
    settings = SlurmSettings(
        job_name="lr-sweep", partition="gpu", account="proj42", qos="normal", time="04:00:00", gpus_per_task=1,
        cpus_per_task=8, mem_gb=64, constraint="h100", extra_directives=("--mail-type=END",),
        setup=("module load cuda/12.4", "source /project/.venv/bin/activate"), workers=8, throttle=4,
        signal_grace_s=300, log_dir="logs/slurm")
    script = slurm.render_script(
        settings, array_size=8, throttle=4, workdir=Path("/project"),
        overrides=slurm.Overrides(sbatch_args=("--exclusive",)),
        worker_command=["/project/.venv/bin/python", "-m", "hparray", "--config-dir", "/project/configs", "--db",
                        "sqlite:////project/results.db", "worker"])
    if os.environ.get("HPARRAY_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "the script changed: see this test's docstring to regenerate"



# ---------------------------------------------------------------- rendering


def test_script_has_the_array_signal_requeue_and_logs() -> None:
    found = directives(render())
    for expected in ("--job-name=sweep", "--time=01:00:00", "--gres=gpu:1", "--cpus-per-task=4", "--mem=16G",
                     '--chdir="/p"', "--array=0-5%2", "--signal=B:USR1@120", "--requeue", "--open-mode=append",
                     '--output="/p/logs/slurm/%x_%A_%a.out"', '--error="/p/logs/slurm/%x_%A_%a.err"'):
        assert expected in found
    assert not any(d.startswith(("--partition", "--account", "--qos", "--constraint")) for d in found)


def test_overrides_and_extra_directives_come_last_so_they_win() -> None:
    settings = replace(SETTINGS, partition="gpu", account="proj", qos="high", constraint="h100",
                       extra_directives=("mail-type=END",), log_dir="/abs/logs")
    found = directives(render(settings, overrides=slurm.Overrides(partition="debug", time="30", gpus=0,
                                                                  sbatch_args=("#SBATCH --exclusive",))))
    assert "--partition=debug" in found and "--account=proj" in found and "--qos=high" in found
    assert "--constraint=h100" in found and "--time=30" in found
    assert not any(d.startswith("--gres") for d in found)
    assert found[-2:] == ["--mail-type=END", "--exclusive"]
    assert '--output="/abs/logs/%x_%A_%a.out"' in found


def test_throttle_never_exceeds_the_array() -> None:
    assert "--array=0-2%3" in directives(render(array_size=3, throttle=10))


def test_worker_runs_in_the_background_with_traps_and_setup_lines() -> None:
    script = render(replace(SETTINGS, setup=("module load cuda/12.4", "source /venv/bin/activate")))
    body = script.splitlines()
    assert "trap 'forward USR1' USR1" in body and "trap 'forward TERM' TERM" in body
    assert " ".join(COMMAND) + " &" in body
    assert body.index("module load cuda/12.4") < body.index(" ".join(COMMAND) + " &")
    assert "SLURM_RESTART_COUNT" in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    path = tmp_path / "worker.sbatch"
    path.write_text(render(replace(SETTINGS, setup=("echo 'it''s set up'",))))
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_worker_command_is_shell_quoted() -> None:
    script = render(worker_command=["python", "-m", "hparray", "--config-dir", "/my project/configs", "worker"])
    assert "python -m hparray --config-dir '/my project/configs' worker &" in script


@pytest.mark.parametrize("overrides, settings, message", [
    (slurm.Overrides(sbatch_args=("--array=0-9",)), SETTINGS, "hparray sets --array itself"),
    (slurm.Overrides(sbatch_args=("",)), SETTINGS, "is not one sbatch option"),
    (slurm.Overrides(time="four hours"), SETTINGS, "is not a Slurm time"),
    (slurm.Overrides(partition="gpu a100"), SETTINGS, "contains whitespace"),
    (slurm.Overrides(), replace(SETTINGS, log_dir="my\\\\logs"), "slurm.log_dir .* backslash"),
])
def test_bad_options_are_bad_input_naming_the_fix(overrides: slurm.Overrides, settings: SlurmSettings,
                                                  message: str) -> None:
    with pytest.raises(BadInput, match=message):
        render(settings, overrides=overrides)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("output, job_id", [("123\n", "123"), ("4567;cluster\n", "4567"),
                                            ("sbatch: warning: x\n89\n", "89")])
def test_parse_sbatch(output: str, job_id: str) -> None:
    assert slurm.parse_sbatch(output) == job_id


def test_parse_sbatch_rejects_anything_else() -> None:
    with pytest.raises(SlurmError, match="instead of a job id"):
        slurm.parse_sbatch("Submitted batch job 12\n")


def test_parse_max_array_size() -> None:
    config = "MailProg                = /bin/true\nMaxArraySize            = 10001\nMaxJobCount = 10000\n"
    assert slurm.parse_max_array_size(config) == 10001
    assert slurm.parse_max_array_size("MaxJobCount = 10000\n") == slurm.DEFAULT_MAX_ARRAY_SIZE


SQUEUE = """\
1_2|1|1|2|PENDING|JobArrayTaskLimit|N/A
1_1|3|1|1|RUNNING|None|2026-11-29T16:20:23
1_0|2|1|0|COMPLETED|None|2026-11-29T16:20:23
7|7|7|N/A|RUNNING|None|2026-11-29T16:21:00
"""


def test_parse_squeue() -> None:
    tasks = slurm.parse_squeue(SQUEUE)
    assert set(tasks) == {"1_2", "1_1", "1_0", "7"}
    assert tasks["1_2"].queued and not tasks["1_2"].alive and tasks["1_2"].started_at is None
    assert tasks["1_1"].alive and tasks["1_1"].job_id == "3" and tasks["1_1"].array_task_id == "1"
    assert tasks["1_1"].started_at is not None
    assert not tasks["1_0"].alive and not tasks["1_0"].queued
    assert tasks["7"].array_task_id is None and tasks["7"].array_job_id == "7"


# ---------------------------------------------------------------- MaxArraySize


def test_small_pools_are_one_array() -> None:
    assert slurm.split_arrays(6, 2, 1001) == [(6, 2)]
    assert slurm.split_arrays(1001, 1001, 1001) == [(1001, 1001)]  # indices 0..1000 < MaxArraySize


def test_large_pools_split_at_max_array_size_sharing_the_throttle() -> None:
    arrays = slurm.split_arrays(2500, 10, 1001)
    assert [size for size, _ in arrays] == [1001, 1001, 498]
    assert all(size - 1 <= 1000 for size, _ in arrays)  # the cap is on the highest index
    assert sum(k for _, k in arrays) == 10 and all(k >= 1 for _, k in arrays)


def test_every_split_array_runs_at_least_one_task() -> None:
    arrays = slurm.split_arrays(5, 1, 2)
    assert [size for size, _ in arrays] == [2, 2, 1] and all(k == 1 for _, k in arrays)


def test_arrays_disabled_is_a_slurm_error() -> None:
    with pytest.raises(SlurmError, match="MaxArraySize is 0"):
        slurm.split_arrays(3, 1, 0)


# ---------------------------------------------------------------- backend choice and secrets


def _path_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripts: dict[str, str]) -> None:
    """PATH = only a folder holding these fake Slurm commands (and the basics they need)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def test_choose_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    none = slurm.Overrides()
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    assert not slurm.choose_backend(local=False, dry_run=False, overrides=none, throttle=None).slurm
    assert slurm.choose_backend(local=False, dry_run=True, overrides=none, throttle=None).slurm
    with pytest.raises(BadInput, match="--partition needs Slurm, but sbatch is not on PATH"):
        slurm.choose_backend(local=False, dry_run=False, overrides=slurm.Overrides(partition="gpu"), throttle=None)
    with pytest.raises(BadInput, match="--throttle only applies to Slurm"):
        slurm.choose_backend(local=True, dry_run=False, overrides=none, throttle=2)
    _path_with(tmp_path, monkeypatch, {"sbatch": "exit 1\n"})
    assert slurm.choose_backend(local=False, dry_run=False, overrides=none, throttle=None).slurm
    assert not slurm.choose_backend(local=True, dry_run=False, overrides=none, throttle=None).slurm


def test_a_database_password_stays_out_of_the_script() -> None:
    command = ["python", "-m", "hparray", "--db", "postgresql://u:secret@db/sweep", "worker"]
    hidden, env = slurm.hide_db_password(command)
    assert "secret" not in " ".join(hidden) and env == {"HPARRAY_DB": "postgresql://u:secret@db/sweep"}
    assert slurm.hide_db_password(COMMAND) == (COMMAND, {})


# ---------------------------------------------------------------- the Slurm-aware reaper


@pytest.fixture
def planned(make_project, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A planned sweep (8 rows), opened in this process."""
    project = make_project(lr_values=[1e-5], per_category=2)
    monkeypatch.chdir(project.root)
    result = CliRunner().invoke(cli, ["--config-dir", str(project.config_dir), "--db", str(project.db),
                                      "plan", "--search", "lr"])
    assert result.exit_code == 0, result.output
    return Store.open(str(project.db), create=False)


def _claim_in_slurm(store: Store, job: str, index: int, now: float, started_at: float | None = None) -> int:
    worker_id = f"node1-{job}_{index}"
    store.register_worker(worker_id, "node1", 1000 + index, started_at or now,
                          slurm={"job_id": str(100 + index), "array_job_id": job, "array_task_id": str(index)})
    task = store.claim(worker_id, now)
    assert task is not None
    return task.id


def test_rows_of_tasks_squeue_no_longer_lists_come_back_at_once(planned: Store, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    planned.record_submission("41", 3, 3, "sbatch --parsable x", "#!/bin/bash", now)
    gone = _claim_in_slurm(planned, "41", 0, now)
    running = _claim_in_slurm(planned, "41", 1, now)
    requeued = _claim_in_slurm(planned, "41", 2, now)
    _path_with(tmp_path, monkeypatch, {"squeue": (
        "echo '41_1|43|41|1|RUNNING|None|2026-01-01T00:00:00'\n"
        "echo '41_2|44|41|2|PENDING|BeginTime|N/A'\n")})
    result = slurm.reap(planned, now + 1, grace_s=300)
    assert sorted(result.report.released) == sorted([gone, requeued])
    assert planned.task_status(running) == "running"
    assert planned.task_status(gone) == "pending"


def test_an_earlier_run_of_a_requeued_task_is_gone(planned: Store, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    planned.record_submission("41", 1, 1, "sbatch --parsable x", "#!/bin/bash", now)
    task = _claim_in_slurm(planned, "41", 0, now, started_at=now - 3600)
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 60))
    _path_with(tmp_path, monkeypatch, {"squeue": f"echo '41_0|42|41|0|RUNNING|None|{started}'\n"})
    assert slurm.reap(planned, now, grace_s=300).report.released == [task]


def test_late_heartbeat_while_slurm_runs_the_task_is_hung_not_reaped(planned: Store, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    planned.record_submission("41", 1, 1, "sbatch --parsable x", "#!/bin/bash", now - 100)
    task = _claim_in_slurm(planned, "41", 0, now - 100)
    _path_with(tmp_path, monkeypatch, {"squeue": "echo '41_0|42|41|0|RUNNING|None|N/A'\n"})
    status = StatusWithSlurm()(planned, now, grace_s=300, heartbeat_interval_s=30)
    assert [row["task_id"] for row in status.hung] == [task]
    assert status.counts.running == 1 and status.reaped == []
    assert status.slurm_jobs[0]["job_id"] == "41" and status.slurm_jobs[0]["summary"] == "1 running"


def test_without_squeue_only_the_grace_reaps(planned: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    planned.record_submission("41", 1, 1, "sbatch --parsable x", "#!/bin/bash", now)
    task = _claim_in_slurm(planned, "41", 0, now)
    _path_with(tmp_path, monkeypatch, {"squeue": "echo 'squeue: error: Unable to contact slurm controller' >&2\n"
                                                 "exit 1\n"})
    assert slurm.reap(planned, now + 1, grace_s=300).report.released == []  # this host's first look at it
    assert slurm.reap(planned, now + 302, grace_s=300).report.released == [task]  # still: a grace on its clock
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    status = StatusWithSlurm()(planned, now, grace_s=300, heartbeat_interval_s=30)
    assert status.slurm_jobs[0]["summary"].startswith("unknown (squeue not found")


def test_squeue_invalid_job_id_means_every_task_is_gone(planned: Store, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    planned.record_submission("41", 1, 1, "sbatch --parsable x", "#!/bin/bash", now)
    task = _claim_in_slurm(planned, "41", 0, now)
    _path_with(tmp_path, monkeypatch, {"squeue": "echo 'slurm_load_jobs error: Invalid job id specified' >&2\n"
                                                 "exit 1\n"})
    assert slurm.reap(planned, now, grace_s=300).report.released == [task]


def test_workers_not_submitted_by_hparray_are_left_to_the_grace(planned: Store, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    planned.record_submission("41", 1, 1, "sbatch --parsable x", "#!/bin/bash", now)
    task = _claim_in_slurm(planned, "77", 0, now)  # sbatch'ed by hand, or on another cluster
    _path_with(tmp_path, monkeypatch, {"squeue": "exit 0\n"})
    assert slurm.reap(planned, now, grace_s=300).report.released == []
    assert planned.task_status(task) == "running"
