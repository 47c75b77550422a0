"""What pyproject.toml promises: every package shipped, the package data inside the wheel, and a
requires-python that is the true minimum of the tested dependency set."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Every CPython minor release a dependency could name as its floor.
PYTHONS = [f"3.{minor}" for minor in range(6, 16)]


def _floor(spec: SpecifierSet) -> str | None:
    """The oldest Python release the specifier admits."""
    return next((version for version in PYTHONS if spec.contains(version + ".0")
                 or spec.contains(version + ".99")), None)


def test_every_package_on_disk_is_in_the_packages_list() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(path.parent.relative_to(REPO).parts)
               for path in (REPO / "hparray").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_requires_python_is_the_floor_of_the_locked_dependencies() -> None:
    """Checked against each installed dependency's own Requires-Python metadata."""
    ours = _floor(SpecifierSet(PYPROJECT["project"]["requires-python"]))
    floors = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name = Requirement(line).name
        try:
            declared = importlib.metadata.metadata(name).get("Requires-Python")
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is in constraints.txt but not installed: run `make venv`")
        if declared:
            floors[name] = _floor(SpecifierSet(declared))
    highest = max(floors.values(), key=lambda v: tuple(map(int, v.split("."))))
    needing = sorted(name for name, floor in floors.items() if floor == highest)
    assert ours == highest, f"requires-python floor is {ours}, but {', '.join(needing)} need {highest}"


def test_published_dependencies_are_ranges_not_pins() -> None:
    project = PYPROJECT["project"]
    every = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pinned = [r for r in every if any(s.operator in ("==", "===") for s in Requirement(r).specifier)]
    assert pinned == [], f"exact pins belong in constraints.txt, not in the published metadata: {pinned}"
    core = {Requirement(r).name for r in project["dependencies"]}
    assert not core & {"torch", "torchvision", "diffusers", "lpips"}, "the core install must not need torch"


@pytest.mark.slow
def test_the_wheel_carries_the_package_data(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("hparray-*.whl"))).namelist())
    expected = {f"hparray/sql/{p.relative_to(REPO / 'sql').as_posix()}" for p in (REPO / "sql").rglob("*.sql")}
    expected |= {f"hparray/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    expected |= {"hparray/sbatch/worker.sbatch.j2", "hparray/demo/weights/demo-ltx/manifest.json"}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
