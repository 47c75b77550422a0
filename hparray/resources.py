"""The files hparray reads at run time besides its code: SQL, the sbatch template, default configs.

They live at the top of the checkout (`sql/`, `sbatch/`, `configs/`) and the build maps them into
the package (`hparray.sql`, ...; see pyproject.toml), so the same import names work from a wheel
and from an editable checkout, with no path arithmetic.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def sql() -> Traversable:
    """`sql/`: migrations/NNNN_*.sql and queries.sql."""
    return files("hparray.sql")


def sbatch() -> Traversable:
    """`sbatch/`: worker.sbatch.j2."""
    return files("hparray.sbatch")


def configs() -> Traversable:
    """`configs/`: base.yaml and the *_search.yaml files."""
    return files("hparray.configs")
