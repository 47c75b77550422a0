"""How often the report's verdict says "significantly better than the baseline" when nothing
differs, and how often it does when one value truly is better: simulated sweeps through the
report's own verdict (`hparray.report.stats.search_verdict`).

One sweep: the seed grid's 13 fine-tune configs (the baseline shared by the 3 searches) on 20
videos. Each video has its own difficulty (sd 1.6 dB, as the demo's per-config CIs imply), each
(config, video) row its own noise (sd 0.3 dB); PSNR is that latent quality, SSIM and LPIPS are
linear in it plus their own noise, so the three metrics are correlated as on real sweeps. Under
the null every config's true effect is 0; for power, one lr value is better by `--effect` dB.
It also counts the verdicts the old rule (unadjusted two-sided p < 0.05) would have given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

SEARCHES: dict[str, list[float]] = {"lr": [1e-6, 5e-6, 1e-5, 5e-5, 1e-4], "condition_frames": [5, 11, 17, 22, 28],
            "finetune_steps": [5, 10, 20, 40, 80]}
BASELINE: dict[str, float] = {"lr": 1e-5, "condition_frames": 22, "finetune_steps": 20}
VIDEOS, VIDEO_SD, NOISE_SD = 20, 1.6, 0.3
METRIC_MODEL = {"psnr": (18.5, 1.0, 0.0), "ssim": (0.36, 0.02, 0.004), "lpips": (0.30, -0.015, 0.004)}


@dataclass
class Rates:
    sweeps: int
    verdicts: int
    significant: int  # verdicts saying "significantly better" (Holm rule)
    old_rule: int  # the same with the unadjusted two-sided p
    searches_with_any: int  # searches with at least one such verdict among their metrics
    detected: int  # power runs: the truly better value named and significant on PSNR

    @property
    def rate(self) -> float:
        return self.significant / self.verdicts


def simulate(sweeps: int, seed: int, effect: float = 0.0) -> Rates:
    """`sweeps` sweeps; with `effect` > 0, lr 5e-6 is better by that many dB (the others null)."""
    from hparray.report.stats import search_verdict, wilcoxon_p

    rng = np.random.default_rng(seed)
    configs = ["baseline"] + [f"{search}={value:g}" for search, values in SEARCHES.items() for value in values
                              if value != BASELINE[search]]
    truly_better = "lr=5e-06"
    rates = Rates(sweeps, 0, 0, 0, 0, 0)
    for _ in range(sweeps):
        video = rng.normal(0.0, VIDEO_SD, VIDEOS)
        quality = {c: 18.5 + video + (effect if c == truly_better else 0.0) + rng.normal(0.0, NOISE_SD, VIDEOS)
                   for c in configs}
        scores = {m: {c: mean + slope * (quality[c] - 18.5) + (rng.normal(0.0, sd, VIDEOS) if sd else 0.0)
                      for c in configs} for m, (mean, slope, sd) in METRIC_MODEL.items()}
        for search in SEARCHES:
            members = [c for c in configs if c.startswith(search + "=")]
            any_here = False
            for metric, by_config in scores.items():
                differences = {c: by_config[c] - by_config["baseline"] for c in members}
                means = {c: float(by_config[c].mean()) for c in ["baseline", *members]}
                verdict = search_verdict(differences, means, "baseline", metric)
                rates.verdicts += 1
                rates.significant += verdict.significant
                any_here |= verdict.significant
                if verdict.config != "baseline":
                    sign = 1.0 if metric != "lpips" else -1.0
                    diffs = differences[verdict.config]
                    p = wilcoxon_p(diffs)
                    rates.old_rule += bool(p is not None and p < 0.05 and sign * diffs.mean() > 0)
                if search == "lr" and metric == "psnr" and verdict.significant and verdict.config == truly_better:
                    rates.detected += 1
            rates.searches_with_any += any_here
    return rates


def main(argv: list[str] | None = None) -> None:
    from bench.common import REPO, console, load_line, machine, table, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", type=int, default=1000)
    parser.add_argument("--effect", type=float, default=0.3, help="dB by which one lr value is truly better")
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args(argv)
    info = machine()
    null = simulate(args.sweeps, args.seed)
    power = simulate(args.sweeps, args.seed + 1, effect=args.effect)
    rows = [["null: verdicts 'significantly better' (Holm, one-sided)", f"{null.significant}/{null.verdicts}",
             f"{100 * null.rate:.2f}%"],
            ["null: the same by the old rule (unadjusted two-sided p)", f"{null.old_rule}/{null.verdicts}",
             f"{100 * null.old_rule / null.verdicts:.2f}%"],
            ["null: searches with any such verdict over their 3 metrics",
             f"{null.searches_with_any}/{3 * null.sweeps}", f"{100 * null.searches_with_any / (3 * null.sweeps):.2f}%"],
            [f"power: lr 5e-6 better by {args.effect:g} dB named and significant (PSNR)",
             f"{power.detected}/{power.sweeps}", f"{100 * power.detected / power.sweeps:.1f}%"]]
    console.print(table(f"Verdicts over {args.sweeps} simulated sweeps (20 videos, 13 configs, 3 metrics)",
                        ["what", "count", "rate"], rows, caption=load_line(info)))
    path = write_json("verdicts", info, [vars(null), vars(power)], settings=vars(args))
    console.print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
