"""What every benchmark shares: the machine it ran on, percentiles, the table and the JSON file.

Benchmarks on a shared 2-core machine are only comparable within one run, so every result
file records the load average before and after, and tables show ratios next to raw numbers.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"

console = Console(width=None if os.isatty(1) else 170)


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15-minute load averages: on 2 shared cores these say how much the numbers can be trusted."""
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """Where and when a run happened."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "load_before": load_average(),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q / 100.0 * len(ordered) + 0.5))))
    return float(ordered[rank - 1])


def write_json(name: str, info: dict[str, Any], rows: list[dict[str, Any]], **extra: Any) -> Path:
    """bench/out/<name>.json: the machine, the load before/after and every row measured."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    info = {**info, "load_after": load_average()}
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": info, "rows": rows, **extra}, indent=2, default=str) + "\n")
    return path


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> Table:
    """A rich table with the first column left-aligned and numbers right-aligned."""
    out = Table(title=title, caption=caption, caption_justify="left")
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*(str(cell) for cell in row))
    return out


def load_line(info: dict[str, Any]) -> str:
    before = info["load_before"]
    return f"{info['date']} on {info['cpus']} cores, load average before {before[0]:.2f} / {before[1]:.2f} (1/5 min)"


def bench_project(root: Path, base_overrides: dict[str, dict[str, Any] | Any],
                  searches: dict[str, list[Any]] | None = None) -> Path:
    """A project folder under `root` with the repo's configs, base.yaml overridden section by
    section and, if given, only the named searches with the given values. Returns configs/."""
    import yaml

    config_dir = root / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    for key, value in base_overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    (config_dir / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    for file in sorted((REPO / "configs").glob("*_search.yaml")):
        search = yaml.safe_load(file.read_text())
        if searches is None:
            (config_dir / file.name).write_text(file.read_text())
        elif search["search"] in searches:
            search["values"] = searches[search["search"]]
            (config_dir / file.name).write_text(yaml.safe_dump(search, sort_keys=False))
    return config_dir


def tiny_model_path(scratch: Path) -> str | None:
    """None (the built-in tiny model) when its trained weights are installed; otherwise the same
    architecture with seeded random weights saved under `scratch`: timings do not depend on the
    weight values, and the benchmarks should not fail on a checkout without the weights."""
    from hparray.runners.ltx import model as ltx

    weights = getattr(ltx, "DEMO_WEIGHTS_DIR", None)
    manifest = getattr(ltx, "MANIFEST", "manifest.json")
    if weights is None or (Path(weights) / manifest).is_file():
        return None
    target = scratch / "tiny-ltx-random"
    if not (target / "model_index.json").is_file():
        import logging

        logging.getLogger("diffusers").setLevel(logging.ERROR)
        ltx.build_tiny_pipeline(None).save_pretrained(str(target))
    console.print(f"[yellow]built-in tiny model weights missing at {weights}: using the same architecture "
                  f"with random weights ({target})[/]")
    return str(target)
