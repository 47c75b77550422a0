"""Acceptance: report.html opens in a real browser (headless Chromium) with every plot and frame
strip decoded, and a screenshot is kept under test-artifacts/ for a person to look at.

No browser driver: a copy of the page gets a script that, on load, writes into document.title
how many <img> there are and which did not decode; `--dump-dom` prints the DOM after load. A
deliberately broken image in the copy proves the check can fail.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.test_report import ReportedSweep, reported_sweep
from tests.conftest import REPO, Project

ARTIFACTS = REPO / "test-artifacts"
STRIP_VIDEOS = 2
CHECK = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); })
                     .map(function (img) { return img.alt; });
  document.title = 'IMAGES ' + images.length + ' BROKEN ' + JSON.stringify(broken);
});
</script>
<img alt="negative-control" src="data:image/png;base64,AAAA">
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        if path := shutil.which(name):
            return path
    return None


def chromium_or_skip() -> str:
    """Debian's chromium; installed with apt-get when we are root, else the test skips and says why."""
    path = find_chromium()
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing and cannot be installed here (needs root and apt-get): "
                    "run `make system-deps` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        subprocess.run(install, env=env, capture_output=True, timeout=900)
    path = find_chromium()
    if not path:
        pytest.skip("chromium is missing and `apt-get install chromium` failed: see `make system-deps`")
    return path


@pytest.fixture
def sweep(make_project: Callable[..., Project]) -> ReportedSweep:
    return reported_sweep(make_project)


def test_report_html_loads_every_plot_and_frame_strip_in_chromium(sweep: ReportedSweep, tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    page = (sweep.out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources), "not self-contained"
    assert "<link" not in page and "@import" not in page
    checked = tmp_path / "report-checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    run = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,4000",
         f"--screenshot={screenshot}", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    shutil.copyfile(sweep.out / "report.html", ARTIFACTS / "report.html")

    title = re.search(r"<title>IMAGES (\d+) BROKEN (.*?)</title>", run.stdout)
    assert title, f"the check script did not run: {run.stdout[:500]!r}"
    broken = json.loads(html.unescape(title.group(2)))
    assert broken == ["negative-control"], f"images that did not decode: {broken}"
    assert int(title.group(1)) == page.count("<img ") + 1

    for plot in sorted((sweep.out / "plots").glob("*.png")):
        assert f'alt="{plot.name}"' in page, f"{plot.name} is not on the page"
    summary = sweep.summary()
    for name in summary["searches"]:  # the per-frame curves, one plot per search
        assert (sweep.out / "plots" / f"{name}_frames.png").is_file() and f'alt="{name}_frames.png"' in page
    for search in summary["searches"].values():
        for name in search["configs"]:
            assert page.count(f'alt="frames {name} ') == STRIP_VIDEOS, f"frame strips of {name}"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
