"""The report's verdict under multiplicity, by simulation through `search_verdict` itself: on
null sweeps (no config differs) it says "significantly better than the baseline" at most 5% of
the time, where the old rule (unadjusted p) said it more often; with one value truly better by
0.3 dB it still finds it. Seeded, so the figures are the same on every machine."""

from __future__ import annotations

import numpy as np

from bench.bench_verdicts import simulate
from hparray.report.stats import search_verdict


def test_null_sweeps_give_at_most_five_percent_false_verdicts() -> None:
    null = simulate(sweeps=150, seed=11)
    print(f"\nnull: {null.significant}/{null.verdicts} = {100 * null.rate:.2f}% significant (Holm), "
          f"old rule {null.old_rule}/{null.verdicts}")
    assert null.verdicts == 150 * 3 * 3
    assert null.rate <= 0.05
    assert null.old_rule > null.significant  # what the unadjusted p claimed on the same sweeps


def test_a_true_effect_is_still_found_and_the_power_reported() -> None:
    power = simulate(sweeps=150, seed=12, effect=0.3)
    print(f"\npower at +0.3 dB: {power.detected}/{power.sweeps} = {100 * power.detected / power.sweeps:.1f}%")
    assert power.detected / power.sweeps >= 0.5


def test_the_family_keeps_its_size_while_configs_are_untested() -> None:
    strong = np.full(20, 1.0) + np.linspace(0, 0.1, 20)  # every video better: one-sided p = 2**-20
    verdict = search_verdict({"a": strong, "b": np.array([]), "c": np.array([]), "d": np.array([])},
                             {"base": 0.0, "a": 1.0}, "base", "psnr")
    assert verdict.config == "a" and verdict.family == 4 and verdict.significant
    assert verdict.p_holm == min(1.0, 4 * verdict.p_value)
    worse = search_verdict({"a": -strong}, {"base": 1.0, "a": 0.0}, "base", "psnr")
    assert worse.config == "base" and not worse.significant
    lpips = search_verdict({"a": -strong}, {"base": 0.5, "a": 0.4}, "base", "lpips")  # lower is better
    assert lpips.config == "a" and lpips.significant
