"""Sequential stopping (`stopping:` in base.yaml, hparray.stopping) by simulation and by replay.

Simulation: how often the rule stops a config that is not worse than the baseline (the false-stop
rate, which Bonferroni over the planned looks keeps at or below alpha), beside the naive rule that
tests at alpha at every look; and how soon it stops a config that truly is worse. Each simulated
sweep is one search: a baseline and `--configs` configs on 20 videos, looks from 9 paired videos
on (K = 12, boundary 0.05 / 12), every look through the worker's own decision
(`hparray.stopping.decide`). Each (config, video) row gets its own noise, sd 0.3 dB as in
bench_verdicts (the per-video difficulty is common to all configs and cancels in the pairing),
drawn from a normal, a heavy-tailed Student t3 or a skewed (centred lognormal) distribution; with
no true difference a config's row and the baseline's row of a video are exchangeable, so their
difference is symmetric about 0 whatever the distribution. A last row draws skewed *differences*
with mean 0 (a config worse than the baseline on most videos by a little, better on a few by a
lot): not a null of the signed-rank test, shown for what the rule means by "worse". The column
"one test at 20" is a single one-sided test at alpha after all 20 videos, the fixed design.

Replay (`--replay DB`): the rule over a finished sweep's stored results, video by video in the
order the rows ran, as live workers would have applied it when rows run video by video: which
configs it stops and when, the GPU-hours with and without it (measured wall time of the rows),
and the report's conclusions (hparray.report.compute on a copy of the database without the rows
it would have skipped): each search's best config per metric and whether it is significantly
better than the baseline, and which configs differ significantly from the baseline (two-sided
Wilcoxon, Holm over the search's configs).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hparray.config import StoppingSettings
from hparray.stopping import decide

VIDEOS, NOISE_SD = 20, 0.3
NOISES = ("normal", "t3", "skewed")


def row_noise(rng: np.random.Generator, kind: str, size: tuple[int, ...]) -> np.ndarray:
    """Per-row noise of sd NOISE_SD from one of NOISES."""
    if kind == "normal":
        return rng.normal(0.0, NOISE_SD, size)
    if kind == "t3":
        return rng.standard_t(3, size) / np.sqrt(3.0) * NOISE_SD  # t3 has variance 3
    if kind == "skewed":
        mean, sd = np.exp(0.5), np.sqrt((np.e - 1.0) * np.e)  # lognormal(0, 1)
        return (rng.lognormal(0.0, 1.0, size) - mean) / sd * NOISE_SD
    raise ValueError(kind)


@dataclass
class Outcome:
    """Configs simulated under one setting, and what each rule did with them."""

    noise: str
    effect_db: float
    sweeps: int
    configs: int = 0
    stopped: int = 0  # Bonferroni over the looks
    naive: int = 0  # the same test at alpha at every look
    single: int = 0  # one test at alpha after all 20 videos (what a fixed design would say)
    sweeps_with_a_stop: int = 0
    stop_videos: list[int] = field(default_factory=list)
    rows_saved: int = 0

    @property
    def rate(self) -> float:
        return self.stopped / self.configs

    @property
    def naive_rate(self) -> float:
        return self.naive / self.configs

    @property
    def mean_stop_videos(self) -> float | None:
        return float(np.mean(self.stop_videos)) if self.stop_videos else None

    @property
    def saved_share(self) -> float:
        return self.rows_saved / (self.configs * VIDEOS)


def simulate(sweeps: int, seed: int, noise: str = "normal", effect_db: float = 0.0, configs: int = 4,
             settings: StoppingSettings | None = None, skewed_differences: bool = False) -> Outcome:
    """`sweeps` searches of `configs` configs against one baseline on VIDEOS videos; every config is
    `effect_db` better (> 0) or worse (< 0) than the baseline on PSNR."""
    settings = settings or StoppingSettings(enabled=True)
    rng = np.random.default_rng(seed)
    out = Outcome(noise + (" differences" if skewed_differences else ""), effect_db, sweeps)
    for _ in range(sweeps):
        baseline = row_noise(rng, noise, (VIDEOS,))
        any_stop = False
        for _config in range(configs):
            if skewed_differences:  # mean 0, median below 0: worse on most videos, better on a few by more
                differences = (rng.exponential(1.0, VIDEOS) - 1.0) * NOISE_SD * np.sqrt(2.0) + effect_db
            else:
                differences = row_noise(rng, noise, (VIDEOS,)) + effect_db - baseline
            out.configs += 1
            looks = [decide(differences[:n], VIDEOS, settings) for n in range(settings.min_videos, VIDEOS + 1)]
            at_alpha = [look.p_value is not None and look.p_value < settings.alpha and (look.mean_diff or 0.0) < 0
                        for look in looks]
            out.naive += any(at_alpha)
            out.single += at_alpha[-1]
            first = next((look for look in looks if look.stop), None)
            if first is not None:
                out.stopped += 1
                out.stop_videos.append(first.videos)
                out.rows_saved += VIDEOS - first.videos
                any_stop = True
        out.sweeps_with_a_stop += any_stop
    return out


# ---------------------------------------------------------------- replay over a finished sweep


@dataclass
class Replayed:
    """What the rule would have done on one stored sweep."""

    video_order: list[str]
    stops: dict[str, dict[str, Any]]  # config name -> videos, p, boundary, rows skipped, GPU-hours saved
    gpu_hours_without: float
    gpu_hours_with: float
    conclusions_without: dict[str, Any]
    conclusions_with: dict[str, Any]

    @property
    def unchanged(self) -> bool:
        return self.conclusions_without == self.conclusions_with


def conclusions(report: Any) -> dict[str, Any]:
    """Per search and metric: the best config, whether it is significantly better than the baseline,
    and the configs whose two-sided Holm-adjusted p against the baseline is below alpha, with the
    direction of their mean difference."""
    from hparray.metrics import HIGHER_IS_BETTER
    from hparray.report.stats import ALPHA

    found: dict[str, Any] = {}
    for search in report.searches:
        for metric in report.metrics:
            best = search.best.get(metric)
            differ = {}
            for c in search.configs:
                cmp = c.vs_baseline.get(metric)
                if not c.is_baseline and cmp is not None and cmp.p_holm is not None and cmp.p_holm < ALPHA:
                    better = (cmp.mean_diff or 0.0) > 0 if HIGHER_IS_BETTER[metric] else (cmp.mean_diff or 0.0) < 0
                    differ[c.name] = "better" if better else "worse"
            found[f"{search.name}/{metric}"] = {
                "best": best.config if best else None, "best_significant": bool(best and best.significant),
                "significantly_different": dict(sorted(differ.items()))}
    return found


def replay(db: Path, settings: StoppingSettings) -> Replayed:
    """Apply the rule video by video over `db` (an SQLite file of a finished sweep)."""
    from sqlalchemy import text

    from hparray.report.compute import compute
    from hparray.stopping import decisions
    from hparray.store import Store
    from hparray.store.stopping import skip_pending

    store = Store.open(str(db), create=False)
    rows = store.report_rows()
    first_row: dict[str, int] = {}
    for r in rows:
        if r.kind == "finetune":
            first_row[r.video] = min(first_row.get(r.video, r.task_id), r.task_id)
    order = sorted(first_row, key=first_row.__getitem__)
    index = {video: i for i, video in enumerate(order)}
    stopped: dict[str, tuple[int, Any]] = {}  # config hash -> (videos done when it stopped, decision)
    for k in range(1, len(order) + 1):
        # The sweep as it stood once the first k videos were done: later rows pending, or skipped
        # for a config already stopped.
        now_rows = [r if r.kind != "finetune" or index[r.video] < k else
                    dataclasses.replace(r, status="skipped" if r.config_hash in stopped else "pending")
                    for r in rows]
        for decision in decisions(now_rows, settings):
            if decision.stop and decision.config_hash not in stopped:
                stopped[decision.config_hash] = (k, decision)
    tasks = {r.task_id: r for r in rows}
    skipped = {h: [r for r in tasks.values() if r.config_hash == h and index.get(r.video, -1) >= k]
               for h, (k, _) in stopped.items()}
    without = compute(store)[0]
    store.close()
    with tempfile.TemporaryDirectory(prefix="hparray-replay-") as scratch:
        copy = Path(scratch) / "replayed.db"
        shutil.copy(db, copy)
        replayed = Store.open(str(copy))
        ids = [r.task_id for mine in skipped.values() for r in mine]
        with replayed.engine.begin() as conn:  # as if those rows had never run: pending, no result
            for task_id in ids:
                conn.execute(text("DELETE FROM results WHERE task_id = :id"), {"id": task_id})
                conn.execute(text("UPDATE tasks SET status = 'pending' WHERE id = :id"), {"id": task_id})
        for _k, decision in stopped.values():
            skip_pending(replayed, decision.record(), time.time())
        with_stopping = compute(replayed)[0]
        replayed.close()
    stops = {}
    for h, (k, decision) in stopped.items():
        stops[decision.name] = {"after_videos": k, "paired_videos": decision.look.videos,
                                "p_value": decision.look.p_value, "boundary": decision.look.boundary,
                                "rows_skipped": len(skipped[h]),
                                "gpu_hours_saved": sum(r.wall_s or 0.0 for r in skipped[h]) / 3600.0}
    return Replayed(order, stops, without.gpu_hours, with_stopping.gpu_hours, conclusions(without),
                    conclusions(with_stopping))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    from bench.common import REPO, console, load_line, machine, table, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", type=int, default=2000)
    parser.add_argument("--configs", type=int, default=4, help="configs per simulated search (the lr search: 4)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--min-videos", type=int, default=9)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--replay", type=Path, action="append", default=[], metavar="DB",
                        help="a finished sweep's SQLite file: replay the rule over its results (repeatable)")
    args = parser.parse_args(argv)
    settings = StoppingSettings(enabled=True, alpha=args.alpha, min_videos=args.min_videos)
    info = machine()
    if args.replay:
        results = {}
        for db in args.replay:
            started = time.time()
            r = replay(db, settings)
            results[str(db)] = dataclasses.asdict(r) | {"unchanged": r.unchanged}
            console.print(table(f"Replay of {db} ({len(r.video_order)} videos, {time.time() - started:.1f} s)",
                                ["config stopped", "after videos", "p", "boundary", "rows skipped", "GPU-h saved"],
                                [[name, s["after_videos"], f"{s['p_value']:.4f}", f"{s['boundary']:.4f}",
                                  s["rows_skipped"], f"{s['gpu_hours_saved']:.3f}"] for name, s in r.stops.items()],
                                caption=f"GPU-hours without {r.gpu_hours_without:.3f}, with {r.gpu_hours_with:.3f} "
                                        f"({100 * (1 - r.gpu_hours_with / r.gpu_hours_without):.1f}% saved)"))
            console.print(table("Conclusions", ["search/metric", "without stopping", "with stopping"],
                                [[key, _said(value), _said(r.conclusions_with[key])]
                                 for key, value in r.conclusions_without.items()],
                                caption="unchanged" if r.unchanged else "CHANGED"))
        path = write_json("stopping_replay", info, [], replays=results, settings=vars(args) | {"replay": None})
        console.print(f"wrote {path.relative_to(REPO)}")
        return
    started = time.time()
    cases = [simulate(args.sweeps, args.seed + i, noise, 0.0, args.configs, settings)
             for i, noise in enumerate(NOISES)]
    cases.append(simulate(args.sweeps, args.seed + 3, "skewed", 0.0, args.configs, settings, skewed_differences=True))
    power = [simulate(args.sweeps, args.seed + 10 + i, "normal", effect, 1, settings)
             for i, effect in enumerate((-0.1, -0.3, -0.5, +0.3))]
    rows = [[c.noise, f"{c.effect_db:+g}", f"{c.stopped}/{c.configs}", f"{100 * c.rate:.2f}%",
             f"{100 * c.naive_rate:.2f}%", f"{100 * c.single / c.configs:.2f}%",
             f"{100 * c.sweeps_with_a_stop / c.sweeps:.2f}%",
             "-" if c.mean_stop_videos is None else f"{c.mean_stop_videos:.1f}", f"{100 * c.saved_share:.1f}%"]
            for c in cases + power]
    console.print(table(f"Sequential stopping, {args.sweeps} simulated searches: alpha {args.alpha}, looks at "
                        f"{args.min_videos}..{VIDEOS} videos (K = {VIDEOS - args.min_videos + 1}), "
                        f"{time.time() - started:.0f} s",
                        ["noise", "effect dB", "stopped", "rate (Bonferroni)", "naive (alpha every look)",
                         "one test at 20", "searches with a stop", "mean stop video", "rows saved"], rows,
                        caption=load_line(info)))
    path = write_json("stopping", info, [dataclasses.asdict(c) | {"rate": c.rate, "naive_rate": c.naive_rate,
                                                                   "mean_stop_videos": c.mean_stop_videos,
                                                                   "saved_share": c.saved_share, "stop_videos": None}
                                         for c in cases + power], settings=vars(args) | {"replay": None})
    console.print(f"wrote {path.relative_to(REPO)}")


def _said(c: dict[str, Any]) -> str:
    best = f"best {c['best']}" + (" (significantly better)" if c["best_significant"] else "")
    differ = ", ".join(f"{name} {way}" for name, way in c["significantly_different"].items()) or "none"
    return f"{best}; differ: {differ}"


if __name__ == "__main__":
    main()
