"""Sequential stopping's decision (hparray.stopping): a config worse than its baseline stops at the
boundary alpha / K, a better one never does, nothing is looked at before min_videos, the baseline is
never stopped; the exact test is scipy's; and a seeded simulation of null searches stops at most
alpha of the configs where testing at alpha at every look stops far more. The settings validate
with one-line messages and stay out of every config hash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.stats import wilcoxon

from bench.bench_stopping import NOISES, simulate
from hparray.config import StoppingSettings, load_settings
from hparray.errors import ConfigError
from hparray.plan import config_hash
from hparray.runners import Hyperparams
from hparray.stopping import decide, decisions, planned_looks, signed_rank_p, worse_p
from hparray.store.records import ReportRow

ON = StoppingSettings(enabled=True)  # alpha 0.05, min_videos 9: K = 12 for 20 videos, boundary 0.05 / 12
WORSE = -np.arange(1.0, 10.0) / 10  # 9 videos, every one worse: one-sided p = 2**-9


def test_a_config_worse_on_every_video_stops_after_min_videos() -> None:
    look = decide(WORSE, 20, ON)
    assert (look.videos, look.looks) == (9, 12)
    assert look.boundary == pytest.approx(0.05 / 12)
    assert look.p_value == pytest.approx(1 / 512)
    assert look.stop


def test_a_better_config_never_stops() -> None:
    for n in range(9, 21):
        look = decide(np.arange(1.0, n + 1) / 10, 20, ON)
        assert not look.stop and look.p_value == pytest.approx(1.0)


def test_the_boundary_is_alpha_over_the_planned_looks() -> None:
    # 8 worse, 1 better with the smallest (rank 1) or second smallest (rank 2) |difference|:
    # p = P(W+ >= 44) = 2/512 = 0.0039 < 0.0042 stops; P(W+ >= 43) = 3/512 = 0.0059 does not.
    rank1 = WORSE.copy()
    rank1[0] = 0.1
    rank2 = WORSE.copy()
    rank2[1] = 0.2
    assert decide(rank1, 20, ON).p_value == pytest.approx(2 / 512) and decide(rank1, 20, ON).stop
    assert decide(rank2, 20, ON).p_value == pytest.approx(3 / 512) and not decide(rank2, 20, ON).stop
    assert decide(rank2, 9, ON).stop  # 9 videos planned: one look, boundary alpha itself
    assert planned_looks(20, 9) == 12 and planned_looks(9, 9) == 1
    assert decide(rank1, 20, ON, baselines=2).boundary == pytest.approx(0.05 / 24)
    assert not decide(rank1, 20, ON, baselines=2).stop  # two baselines: Bonferroni over them too


def test_nothing_is_looked_at_before_min_videos() -> None:
    look = decide(WORSE[:8], 20, ON)
    assert look.p_value is None and not look.stop
    assert decide(WORSE[:8], 20, ON.model_copy(update={"min_videos": 8})).stop is False  # 2**-8 > 0.05/13
    assert decide(WORSE[:8], 8, ON.model_copy(update={"min_videos": 8})).stop  # K = 1: 2**-8 < 0.05


def test_lower_is_better_metrics_stop_on_higher_values() -> None:
    lpips = ON.model_copy(update={"metric": "lpips"})
    assert decide(-WORSE, 20, lpips).stop and not decide(WORSE, 20, lpips).stop


def test_the_exact_p_is_scipys_one_sided_wilcoxon() -> None:
    rng = np.random.default_rng(3)
    for n in (2, 5, 9, 14, 20, 30):
        for _ in range(20):
            x = rng.normal(size=n) + rng.normal() * 0.5
            assert signed_rank_p(x) == pytest.approx(wilcoxon(x, alternative="greater").pvalue, abs=1e-12)
    tied = np.array([0.3, -0.3, 0.5, 0.0, 0.7, 0.9])  # a tie and a zero: scipy's own answer
    assert signed_rank_p(tied) == pytest.approx(wilcoxon(tied, alternative="greater").pvalue)
    assert worse_p(WORSE, "psnr") == pytest.approx(wilcoxon(-WORSE, alternative="greater").pvalue)


def test_null_searches_stop_at_most_alpha_of_the_configs_and_the_naive_rule_more() -> None:
    """300 seeded searches of 4 configs per noise: no config differs from the baseline."""
    for i, noise in enumerate(NOISES):
        null = simulate(300, seed=40 + i, noise=noise, settings=ON)
        print(f"\n{noise}: {null.stopped}/{null.configs} = {100 * null.rate:.2f}% stopped (Bonferroni), "
              f"naive {100 * null.naive_rate:.2f}%")
        assert null.configs == 1200
        assert null.rate <= 0.05
        assert null.naive_rate > 0.05 and null.naive > 3 * null.stopped  # what testing at alpha every look does


def test_a_truly_worse_config_is_stopped_early_and_a_better_one_never() -> None:
    worse = simulate(100, seed=50, effect_db=-0.5, configs=1, settings=ON)
    better = simulate(100, seed=51, effect_db=+0.5, configs=1, settings=ON)
    print(f"\n-0.5 dB: {worse.stopped}/100 stopped, at video {worse.mean_stop_videos:.1f} on average")
    assert worse.rate >= 0.9 and (worse.mean_stop_videos or 20) < 14
    assert better.stopped == 0


# ---------------------------------------------------------------- a sweep's configs


def _row(task_id: int, config: str, video: str, psnr: float | None, *, search: str = "lr", baseline: bool = False,
         status: str = "done", cf: int = 22, frames: list[float] | None = None) -> ReportRow:
    per_frame = json.dumps({"first_frame": cf, "psnr": frames}) if frames is not None else None
    return ReportRow(task_id=task_id, kind="finetune", status=status, video=video, config_hash=config, lr=None,
                     condition_frames=cf, finetune_steps=20, category="c", video_path="", search=search,
                     name=config, parameter="lr", value=0.0, is_baseline=int(baseline),
                     psnr=psnr if status == "done" else None, ssim=None, lpips=None, trivial_psnr=None,
                     trivial_ssim=None, trivial_lpips=None, finetune_s=None, inference_s=None, wall_s=1.0,
                     artifact_dir=None, per_frame=per_frame, depends_status="done", estimate_s=300.0)


def _sweep(done: int, offsets: dict[str, float], videos: int = 20, **kw: Any) -> list[ReportRow]:
    """`videos` videos; the first `done` scored; config -> its PSNR offset from 'base' (the baseline)."""
    rng = np.random.default_rng(0)
    rows, task = [], 0
    for v in range(videos):
        level = 20 + rng.normal()
        for config, offset in {"base": 0.0, **offsets}.items():
            task += 1
            noise = 0.01 * rng.normal()
            rows.append(_row(task, config, f"v{v:02d}", level + offset + noise, baseline=config == "base",
                             status="done" if v < done else "pending", **kw))
    return rows


def test_the_sweep_stops_a_worse_config_never_a_better_one_nor_the_baseline() -> None:
    found = {d.config_hash: d for d in decisions(_sweep(9, {"bad": -1.0, "good": +1.0, "same": 0.0}), ON)}
    assert set(found) == {"bad", "good", "same"}  # the baseline is never a candidate
    assert found["bad"].stop and found["bad"].look.videos == 9
    assert not found["good"].stop and not found["same"].stop
    assert not decisions(_sweep(8, {"bad": -1.0}), ON)[0].stop  # before min_videos
    assert decisions(_sweep(20, {"bad": -1.0}), ON) == []  # nothing pending: nothing to stop


def test_the_baseline_config_of_any_search_is_never_stopped() -> None:
    rows = _sweep(9, {"bad": -1.0})
    # 'bad' is also the baseline of another search: it is never stopped
    rows += [dataclasses.replace(r, search="other", is_baseline=1) for r in rows if r.config_hash == "bad"]
    assert all(d.config_hash != "bad" for d in decisions(rows, ON))


def test_a_config_given_a_harder_task_stops_only_if_worse_on_the_common_frames() -> None:
    # cf 5 scores lower on its own frames (5-11) but the same on frames 28-48 as the baseline (cf 28)
    def rows_for(window_offset: float) -> list[ReportRow]:
        rows = []
        for r in _sweep(9, {"cf_5": -1.0}, videos=12):
            cf = 5 if r.config_hash == "cf_5" else 28
            shift = window_offset if r.config_hash == "cf_5" else 0.0
            frames = [float(r.psnr or 0) + shift + 1.0] * (49 - cf) if r.status == "done" else None
            rows.append(dataclasses.replace(r, condition_frames=cf, per_frame=json.dumps(
                {"first_frame": cf, "psnr": frames}) if frames else None))
        return rows

    easier = decisions(rows_for(+1.0), ON)[0]  # on the common window it is as good as the baseline
    assert easier.look.stop and easier.window is not None and not easier.window.stop and not easier.stop
    harder = decisions(rows_for(0.0), ON)[0]  # worse on the common window as well
    assert harder.stop and harder.window is not None and harder.window.stop


# ---------------------------------------------------------------- settings


def _settings(tmp_path: Path, stopping: dict[str, Any], **data: Any) -> Any:
    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "base.yaml").read_text())
    base["stopping"] = {**base["stopping"], **stopping}
    base["data"].update(data)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    return load_settings(tmp_path)


def test_stopping_is_off_by_default_and_out_of_every_config_hash(tmp_path: Path) -> None:
    off = _settings(tmp_path, {})
    assert off.stopping == StoppingSettings() and not off.stopping.enabled
    on = _settings(tmp_path, {"enabled": True, "alpha": 0.1, "min_videos": 5})
    hp = Hyperparams(lr=1e-5, condition_frames=22, finetune_steps=20)
    assert config_hash("finetune", hp, off) == config_hash("finetune", hp, on)


@pytest.mark.parametrize("stopping, data, message", [
    ({"alpha": 0}, {}, "stopping.alpha must be > 0"),
    ({"min_videos": 1}, {}, "stopping.min_videos must be >= 2"),
    ({"metric": "fid"}, {}, "stopping.metric must be 'psnr', 'ssim' or 'lpips'"),
    ({"enabled": "yes"}, {}, "stopping.enabled must be true or false"),
    ({"enabled": True, "min_videos": 30}, {}, "stopping.min_videos is 30 but data.num_videos is 20"),
    ({"enabled": True, "min_videos": 4}, {"num_videos": 4}, "stopping can never stop a config"),
    ({"colour": 1}, {}, "stopping.colour is not a known key"),
])
def test_bad_stopping_settings_are_one_line_errors(tmp_path: Path, stopping: dict[str, Any], data: dict[str, Any],
                                                   message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _settings(tmp_path, stopping, **data)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
