"""report.html: one self-contained page (tables, plots, frame strips; images as data URIs),
rendered from templates/report.html.j2 through the package's one jinja2 environment."""

from __future__ import annotations

import time

import jinja2

from hparray.metrics import HIGHER_IS_BETTER, METRIC_LABELS
from hparray.report.compute import Report, SearchReport
from hparray.report.format import data_uri, fmt_metric, fmt_p, signed, value_name
from hparray.report.plots import safe_name
from hparray.report.stats import ALPHA, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE
from hparray.report.strips import Strip

ENVIRONMENT = jinja2.Environment(loader=jinja2.PackageLoader("hparray.report", "templates"), autoescape=True,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(report: Report, plots: dict[str, bytes], strips: dict[str, list[Strip]]) -> str:
    """One self-contained page: tables, plots and frame strips, images as base64 data URIs."""
    template = ENVIRONMENT.get_template("report.html.j2")
    uris = {name: data_uri(png) for name, png in plots.items()}

    def plot_names(search: SearchReport) -> list[str]:
        names = [f"{safe_name(search.name)}_{kind}.png" for kind in ("metrics", "deltas", "frames", "cost")]
        return [name for name in names if name in uris]

    def ci(low: float | None, high: float | None, metric: str) -> str:
        return "-" if low is None or high is None else f"[{fmt_metric(low, metric)}, {fmt_metric(high, metric)}]"

    def ci_diff(low: float | None, high: float | None) -> str:
        return "-" if low is None or high is None else f"[{low:+.3g}, {high:+.3g}]"

    strip_views = {key: [{"video": s.video, "category": s.category, "caption": s.caption, "uri": data_uri(s.png)}
                         for s in value] for key, value in strips.items()}
    return template.render(
        report=report, generated=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.generated_at)),
        labels=METRIC_LABELS, higher=HIGHER_IS_BETTER, plots=uris, strips=strip_views, plot_names=plot_names,
        fmt=fmt_metric, signed=signed, p=fmt_p, ci=ci, ci_diff=ci_diff, confidence=CONFIDENCE,
        resamples=BOOTSTRAP_RESAMPLES,
        seed=BOOTSTRAP_SEED, alpha=ALPHA, value=value_name,
        seconds=lambda s: "-" if s is None else f"{s:.1f}",
    )

