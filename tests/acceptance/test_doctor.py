"""`hparray doctor`: every check reported, failures named, and the exit code follows them."""

from __future__ import annotations

from tests.conftest import Project

CHECKS = ("python", "packages", "gpus", "lpips weights", "model", "disk", "sqlite", "database")


def test_doctor_reports_every_check(make_project) -> None:
    project: Project = make_project()
    assert project.run("plan", "--search", "lr").returncode == 0
    result = project.run("doctor")
    for name in CHECKS:
        assert name in result.stdout, name
    assert "journal_mode wal" in result.stdout
    failing = [line for line in result.stdout.splitlines() if "│ fail " in line]
    assert (result.returncode != 0) == bool(failing), result.stdout + result.stderr
    if failing:
        assert result.stderr.strip().startswith("error: doctor: fix")


def test_lpips_missing_is_a_failure_only_when_asked_for(make_project, tmp_path) -> None:
    project: Project = make_project()
    empty_home = {"TORCH_HOME": str(tmp_path / "torch-home")}
    quiet = project.run("doctor", env=empty_home)
    lpips_line = next(line for line in quiet.stdout.splitlines() if "lpips weights" in line)
    assert "warn" in lpips_line  # the test project scores PSNR only
    base = project.base()
    base["metrics"] = ["psnr", "lpips"]
    project.write_base(base)
    loud = project.run("doctor", env=empty_home)
    lpips_line = next(line for line in loud.stdout.splitlines() if "lpips weights" in line)
    assert "fail" in lpips_line and loud.returncode == 1
    assert project.run("plan", "--search", "lr").returncode == 0
    refused = project.run("submit", "--local", env=empty_home)
    assert refused.returncode != 0 and "alexnet-owt-7be5be79.pth" in refused.stderr
    assert "Traceback" not in refused.stderr
