from tests.conftest import Project


def test_plan_then_local_workers_finish_everything(make_project) -> None:
    project: Project = make_project()
    assert project.run("plan", "--search", "lr").returncode == 0
    run = project.run("submit", "--local", "--workers", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    status = project.run("status", "--json")
    import json
    data = json.loads(status.stdout)
    assert data["done"] == data["total"] == 6 * 3 + 6
