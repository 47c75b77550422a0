"""How the report writes numbers (terminal and page alike)."""

from __future__ import annotations

import base64

from hparray.config import format_value
from hparray.metrics import METRIC_UNITS


def fmt_metric(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def signed(value: float | None, metric: str) -> str:
    """A difference to 3 significant digits: a tiny difference must not print as +0.0000."""
    if value is None:
        return "-"
    return f"{value:+.3g}{METRIC_UNITS[metric]}"


def fmt_p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")



def value_name(value: float) -> str:
    return format_value(int(value)) if float(value).is_integer() and value >= 1 else format_value(value)
