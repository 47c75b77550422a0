"""The files hparray reads at run time besides its code: SQL, the sbatch template, default configs.

They live at the top of the checkout (`sql/`, `sbatch/`, `configs/`) and the build maps them into
the package (`hparray.sql`, ...; see pyproject.toml), so the same import names work from a wheel
and from an editable checkout, with no path arithmetic.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from hparray.errors import ConfigError


def sql() -> Traversable:
    """`sql/`: migrations/NNNN_*.sql and queries.sql."""
    return files("hparray.sql")


def sbatch() -> Traversable:
    """`sbatch/`: worker.sbatch.j2."""
    return files("hparray.sbatch")


def configs() -> Traversable:
    """`configs/`: base.yaml and the *_search.yaml files."""
    return files("hparray.configs")


def examples() -> list[str]:
    """The names of the shipped example base.yaml files (configs/examples/NAME.yaml)."""
    return sorted(f.name.removesuffix(".yaml") for f in configs().joinpath("examples").iterdir()
                  if f.name.endswith(".yaml"))


def write_starter_configs(project: Path, force: bool = False, example: str | None = None) -> list[Path]:
    """Copy the shipped, commented configs (base.yaml and the three searches) into
    `project/configs/`, base.yaml from configs/examples/`example`.yaml when given; refuses to
    overwrite a file unless `force`. Returns the files written."""
    if example is not None and example not in examples():
        raise ConfigError(f"--example {example!r} is not a shipped example: use one of {', '.join(examples())}")
    shipped = sorted((f for f in configs().iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    if example is not None:
        shipped = [configs().joinpath("examples", f"{example}.yaml") if f.name == "base.yaml" else f for f in shipped]
    target = Path(project) / "configs"
    existing = [target / f.name for f in shipped if (target / f.name).exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists: edit it, or pass --force to overwrite the starter configs")
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for f in shipped:
            name = "base.yaml" if f.name == f"{example}.yaml" else f.name
            (target / name).write_text(f.read_text())
            written.append(target / name)
    except OSError as exc:
        raise ConfigError(f"cannot write {target} ({exc.strerror}): choose a folder you can write") from None
    return written
