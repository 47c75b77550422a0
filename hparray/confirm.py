"""The confirmation search: each finished search's best value, together, against the baseline.

One-factor-at-a-time searches cannot say whether their best values combine: the best lr, the best
condition_frames and the best steps may each beat the baseline and still not add up (or add up
to more). `hparray plan --search confirm` plans one fine-tune config that takes each search's
best value (best mean of the first metric in `metrics`), named after the configs it combines
(`lr_5e-6+cf_28+steps_40`), on the same videos, paired with the baseline config whose rows exist
already. It is refused until every search of the sweep has finished. The report then sets the
combination's effect beside the sum of the single-factor effects (`report.compute`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hparray.config import HYPERPARAMETERS, Search, SweepConfig
from hparray.errors import BadInput
from hparray.plan import Plan, PlannedConfig, config_hash, plan_rows
from hparray.runners import Hyperparams
from hparray.runners.protocol import build_runner, runner_identity
from hparray.store import Store
from hparray.videos import VideoRef

CONFIRM = "confirm"
JOINER = "+"


class NotReady(BadInput):
    """The confirmation search needs every search finished first."""


@dataclass(frozen=True)
class Combination:
    """Each search's best value on `metric`, as the config that had it, and the hyperparameters together."""

    metric: str
    chosen: dict[str, str] = field(default_factory=dict)  # search -> its best config's name
    hp: Hyperparams = Hyperparams(0.0, 0, 0)

    @property
    def name(self) -> str:
        return JOINER.join(self.chosen.values())


def combination(sweep: SweepConfig, store: Store) -> Combination:
    """The best value of every finished search; NotReady while one is missing or still running."""
    from hparray.report.compute import compute

    report, _ = compute(store)
    found = {s.name: s for s in report.searches}
    metric = sweep.settings.metrics[0]
    missing = [name for name in sweep.searches if name not in found]
    running = [f"{name} ({sum(c.rows['total'] - c.videos_completed for c in found[name].configs)} rows left)"
               for name in sweep.searches if name in found and found[name].partial]
    if missing or running:
        todo = [f"{name} (not planned)" for name in missing] + running
        raise NotReady(f"--search {CONFIRM} combines the best value of every search, and these are not finished: "
                       f"{', '.join(todo)}: plan and run them first (`hparray plan --search all`, `hparray submit`)")
    base = sweep.settings.baseline
    values = {name: getattr(base, name) for name in HYPERPARAMETERS}
    chosen = {}
    for name, search in sweep.searches.items():
        best = found[name].best.get(metric)
        if best is None:
            raise NotReady(f"--search {CONFIRM}: search {name} has no {metric} scores (every row diverged or "
                           "failed): look at `hparray status`")
        chosen[name] = best.config
        values[search.parameter] = best.value
    hp = Hyperparams(lr=float(values["lr"]), condition_frames=int(values["condition_frames"]),
                     finetune_steps=int(values["finetune_steps"]))
    if hp == Hyperparams(base.lr, base.condition_frames, base.finetune_steps):
        raise NotReady(f"--search {CONFIRM}: every search's best {metric} is the baseline's own value, so the "
                       "combination is the baseline: there is nothing to confirm")
    return Combination(metric, chosen, hp)


def confirm_plan(sweep: SweepConfig, videos: list[VideoRef], combo: Combination) -> Plan:
    """The baseline config (its rows exist: same hash) and the combination, as one search
    `confirm` (values 0 and 1); the un-fine-tuned rows they wait for are the searches' own."""
    settings = sweep.settings
    base = settings.baseline
    identity = runner_identity(build_runner(settings))
    search = Search(name=CONFIRM, parameter="combined", values=(0, 1), prefix=CONFIRM,
                    file=Path("(from the finished searches)"), description="each search's best value together")
    configs = []
    for hp, name, value in ((Hyperparams(base.lr, base.condition_frames, base.finetune_steps), "baseline", 0.0),
                            (combo.hp, combo.name, 1.0)):
        digest, params = config_hash("finetune", hp, settings, identity)
        config = PlannedConfig(digest, "finetune", hp, params, names={CONFIRM: name}, values={CONFIRM: value})
        if value == 0.0:
            config.baseline_in.add(CONFIRM)
        configs.append(config)
    return plan_rows(settings, [search], configs, videos)
