"""Sweep configuration: `configs/base.yaml` plus one `<search>_search.yaml` per searched factor.

Everything is validated on load, so a typo costs a second at the terminal, not a GPU-hour on
the cluster: every problem is reported as one line naming the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hparray.errors import ConfigError

HYPERPARAMETERS = ("lr", "condition_frames", "finetune_steps")
METRICS = ("psnr", "ssim", "lpips")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float: YAML 1.1 insists on a dot, users never write one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Baseline:
    """The point every search varies one factor around."""

    lr: float
    condition_frames: int
    finetune_steps: int


@dataclass(frozen=True)
class DataSettings:
    source: str
    num_videos: int
    stratify_by: str
    num_frames: int
    height: int
    width: int


@dataclass(frozen=True)
class TaskSettings:
    max_attempts: int
    max_losses: int
    circuit_breaker: int
    gpu_minutes_per_task: float
    baseline_gpu_minutes: float
    heartbeat_interval_s: float
    heartbeat_grace_s: float


@dataclass(frozen=True)
class SlurmSettings:
    job_name: str
    partition: str | None
    account: str | None
    qos: str | None
    time: str
    gpus_per_task: int
    cpus_per_task: int
    mem_gb: int
    constraint: str | None
    extra_directives: tuple[str, ...]
    setup: tuple[str, ...]
    workers: int
    throttle: int
    signal_grace_s: int
    log_dir: str


@dataclass(frozen=True)
class Settings:
    """The validated content of `configs/base.yaml`."""

    seed: int
    baseline: Baseline
    data: DataSettings
    runner: dict[str, Any]
    model: dict[str, Any]
    metrics: tuple[str, ...]
    tasks: TaskSettings
    slurm: SlurmSettings
    output_dir: str
    config_dir: Path

    def experiment_fingerprint(self) -> dict[str, Any]:
        """What, besides the hyperparameters, decides a task's result; part of every config hash."""
        return {
            "runner": {"name": self.runner["name"], "command": list(self.runner["command"])},
            "model": dict(sorted(self.model.items())),
            "frames": [self.data.num_frames, self.data.height, self.data.width],
            "seed": self.seed,
        }

    def output_path(self) -> Path:
        """Artifacts folder; relative paths are relative to the project folder (configs' parent)."""
        path = Path(self.output_dir)
        return path if path.is_absolute() else self.config_dir.parent / path


@dataclass(frozen=True)
class Search:
    """One factor varied around the baseline, from `<name>_search.yaml`."""

    name: str
    parameter: str
    values: tuple[float | int, ...]
    prefix: str
    file: Path
    description: str = ""


@dataclass(frozen=True)
class SweepConfig:
    settings: Settings
    searches: dict[str, Search] = field(default_factory=dict)

    def select(self, which: str) -> list[Search]:
        """The searches named by `--search` (`all` = every search file)."""
        if which == "all":
            return list(self.searches.values())
        if which not in self.searches:
            known = ", ".join([*self.searches, "all"])
            raise ConfigError(
                f"--search {which!r}: no configs/{which}_search.yaml; choose one of {known}"
            )
        return [self.searches[which]]


# ---------------------------------------------------------------- validation helpers

Check = Callable[[Any], str | None]


class _Section:
    """Reads one mapping of a YAML file, naming `file: key` in every complaint."""

    def __init__(self, file: Path, prefix: str, data: Any, known: tuple[str, ...]):
        self.file, self.prefix = file, prefix
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(prefix.rstrip(".") or "top level", f"must be a mapping of keys, got {_show(data)}",
                             "indent the keys under it")
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(known)}"
                raise self.error(f"{prefix}{key}", "is not a known key", hint)
        self.data = data

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key} {problem}: {fix}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., check: Check | None = None,
            fix: str = "") -> Any:
        name = f"{self.prefix}{key}"
        if key not in self.data or (self.data[key] is None and default is None):
            if default is ...:
                raise self.error(name, "is missing", fix or f"add {name} to {self.file.name}")
            return default
        value = _coerce(self.data[key], kind)
        if value is _BAD:
            raise self.error(name, f"must be {_kind_name(kind)}, got {_show(self.data[key])}",
                             fix or f"write a {_kind_name(kind)}")
        if check is not None and (problem := check(value)):
            raise self.error(name, problem, fix or "change the value")
        return value

    def sub(self, key: str, known: tuple[str, ...]) -> _Section:
        return _Section(self.file, f"{self.prefix}{key}.", self.data.get(key), known)


_BAD = object()


def _coerce(value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return _BAD
    if isinstance(value, kinds):
        return float(value) if float in kinds and int not in kinds and isinstance(value, int) else value
    if float in kinds and isinstance(value, int):
        return float(value)
    if float in kinds and isinstance(value, str):
        try:  # '1e-5' written in quotes, or read as a string by another YAML tool
            return float(value)
        except ValueError:
            return _BAD
    if int in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    if list in kinds and isinstance(value, tuple):
        return list(value)
    return _BAD


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false",
             dict: "a mapping"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds if k is not type(None)) or "null"


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be >= {low}, got {value}"


def _multiple_of(n: int) -> Check:
    return lambda value: None if value > 0 and value % n == 0 else f"must be a positive multiple of {n}, got {value}"


def _is_slurm_time(value: str) -> bool:
    from hparray.slurm import slurm_seconds

    try:
        slurm_seconds(value)
    except ValueError:
        return False
    return True


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found: run hparray from the project folder that holds configs/, or pass --config-dir"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}): check its permissions") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} is not valid YAML ({problem}): fix the syntax there") from None


# ---------------------------------------------------------------- loading

BASE_KEYS = ("seed", "baseline", "data", "runner", "model", "metrics", "tasks", "slurm", "output_dir")
MODEL_KEYS = ("path", "finetune", "lora_rank", "inference_steps", "guidance_scale", "dtype", "frame_rate")


def load_settings(config_dir: Path) -> Settings:
    """Read and validate `base.yaml` in `config_dir`."""
    file = config_dir / "base.yaml"
    top = _Section(file, "", _read_yaml(file), BASE_KEYS)

    base = top.sub("baseline", HYPERPARAMETERS)
    baseline = Baseline(
        lr=base.get("lr", float, check=_positive, fix="use a positive learning rate such as 1e-5"),
        condition_frames=base.get("condition_frames", int, check=_at_least(1), fix="condition on at least 1 frame"),
        finetune_steps=base.get("finetune_steps", int, check=_at_least(0), fix="use 0 or more steps"),
    )

    d = top.sub("data", ("source", "num_videos", "stratify_by", "num_frames", "height", "width"))
    data = DataSettings(
        source=d.get("source", str, fix="set data.source to 'sample', a folder of videos or a CSV manifest"),
        num_videos=d.get("num_videos", int, 20, _at_least(1)),
        stratify_by=d.get("stratify_by", str, "category",
                          lambda v: None if v == "category" else f"must be 'category', got {v!r}",
                          fix="stratify by 'category' (the subfolder or manifest column)"),
        num_frames=d.get("num_frames", int, 49, _at_least(2)),
        height=d.get("height", int, 64, _multiple_of(32), fix="LTX-Video needs heights that are multiples of 32"),
        width=d.get("width", int, 64, _multiple_of(32), fix="LTX-Video needs widths that are multiples of 32"),
    )
    if baseline.condition_frames >= data.num_frames:
        raise base.error("baseline.condition_frames",
                         f"is {baseline.condition_frames} but videos have data.num_frames {data.num_frames}",
                         "condition on fewer frames than the video has, so some frames are left to score")

    r = top.sub("runner", ("name", "command", "timeout_s"))
    runner = {
        "name": r.get("name", str, "ltx"),
        "command": tuple(r.get("command", list, [])),
        "timeout_s": r.get("timeout_s", float, 3600.0, _positive),
    }
    if runner["name"] == "command" and not runner["command"]:
        raise r.error("runner.command", "is empty but runner.name is 'command'",
                      "give the script's argv as a list, e.g. [python, infer.py, --video, '{video}']")
    if not all(isinstance(arg, str) for arg in runner["command"]):
        raise r.error("runner.command", "must be a list of strings", "quote every argument")

    m = top.sub("model", MODEL_KEYS)
    model = {
        "path": m.get("path", str, None),
        "finetune": m.get("finetune", str, "full",
                          lambda v: None if v in ("full", "lora") else f"must be 'full' or 'lora', got {v!r}"),
        "lora_rank": m.get("lora_rank", int, 8, _at_least(1)),
        "inference_steps": m.get("inference_steps", int, 8, _at_least(1)),
        "guidance_scale": m.get("guidance_scale", float, 1.0, _at_least(1.0)),
        "dtype": m.get("dtype", str, "float32",
                       lambda v: None if v in ("float32", "bfloat16", "float16") else
                       f"must be float32, bfloat16 or float16, got {v!r}"),
        "frame_rate": m.get("frame_rate", int, 25, _at_least(1)),
    }

    metrics = tuple(top.get("metrics", list, list(METRICS)))
    for metric in metrics:
        if metric not in METRICS:
            raise top.error("metrics", f"contains {metric!r}", f"use some of {', '.join(METRICS)}")
    if not metrics:
        raise top.error("metrics", "is empty", f"list at least one of {', '.join(METRICS)}")

    t = top.sub("tasks", ("max_attempts", "max_losses", "circuit_breaker", "gpu_minutes_per_task",
                          "baseline_gpu_minutes",
                          "heartbeat_interval_s", "heartbeat_grace_s"))
    tasks = TaskSettings(
        max_attempts=t.get("max_attempts", int, 3, _at_least(1)),
        max_losses=t.get("max_losses", int, 10, _at_least(1)),
        circuit_breaker=t.get("circuit_breaker", int, 3, _at_least(0)),
        gpu_minutes_per_task=t.get("gpu_minutes_per_task", float, 5.0, _positive),
        baseline_gpu_minutes=t.get("baseline_gpu_minutes", float, 1.0, _positive),
        heartbeat_interval_s=t.get("heartbeat_interval_s", float, 30.0, _positive),
        heartbeat_grace_s=t.get("heartbeat_grace_s", float, 300.0, _positive),
    )
    if tasks.heartbeat_grace_s < 2 * tasks.heartbeat_interval_s:
        raise t.error("tasks.heartbeat_grace_s", f"is {tasks.heartbeat_grace_s} s, under twice the heartbeat interval",
                      "make the grace at least 2x tasks.heartbeat_interval_s so one late beat is not a death")

    s = top.sub("slurm", ("job_name", "partition", "account", "qos", "time", "gpus_per_task", "cpus_per_task",
                          "mem_gb", "constraint", "extra_directives", "setup", "workers", "throttle",
                          "signal_grace_s", "log_dir"))
    slurm = SlurmSettings(
        job_name=s.get("job_name", str, "hparray"),
        partition=s.get("partition", str, None),
        account=s.get("account", str, None),
        qos=s.get("qos", str, None),
        time=s.get("time", str, "04:00:00",
                   lambda v: None if _is_slurm_time(v) else f"is not a Slurm time, got {v!r}",
                   fix="write it as Slurm does: MM, HH:MM:SS or D-HH:MM:SS"),
        gpus_per_task=s.get("gpus_per_task", int, 1, _at_least(0)),
        cpus_per_task=s.get("cpus_per_task", int, 8, _at_least(1)),
        mem_gb=s.get("mem_gb", int, 64, _at_least(1)),
        constraint=s.get("constraint", str, None),
        extra_directives=tuple(s.get("extra_directives", list, [])),
        setup=tuple(s.get("setup", list, [])),
        workers=s.get("workers", int, 8, _at_least(1)),
        throttle=s.get("throttle", int, 8, _at_least(1)),
        signal_grace_s=s.get("signal_grace_s", int, 300, _at_least(1)),
        log_dir=s.get("log_dir", str, "logs/slurm"),
    )

    return Settings(
        seed=top.get("seed", int, 0),
        baseline=baseline,
        data=data,
        runner=runner,
        model=model,
        metrics=metrics,
        tasks=tasks,
        slurm=slurm,
        output_dir=top.get("output_dir", str, "results"),
        config_dir=config_dir.resolve(),
    )


SEARCH_KEYS = ("search", "parameter", "values", "prefix", "description")
DEFAULT_PREFIX = {"lr": "lr", "condition_frames": "cf", "finetune_steps": "steps"}


def load_search(file: Path, settings: Settings) -> Search:
    """Read one `<name>_search.yaml` and check its values against the baseline."""
    name = file.name[: -len("_search.yaml")]
    top = _Section(file, "", _read_yaml(file), SEARCH_KEYS)
    declared = top.get("search", str, name)
    if declared != name:
        raise top.error("search", f"is {declared!r} but the file is named {file.name}",
                        f"rename the file to {declared}_search.yaml or set search: {name}")
    parameter = top.get("parameter", str)
    if parameter not in HYPERPARAMETERS:
        raise top.error("parameter", f"is {parameter!r}, which the baseline in base.yaml does not have",
                        f"vary one of {', '.join(HYPERPARAMETERS)}")
    kind = float if parameter == "lr" else int
    raw = top.get("values", list, fix="list the values to try, e.g. values: [1e-6, 1e-5, 1e-4]")
    if not raw:
        raise top.error("values", "is empty", "list at least one value to try")
    values: list[float | int] = []
    for i, item in enumerate(raw):
        value = _coerce(item, kind)
        if value is _BAD:
            raise top.error(f"values[{i}]", f"must be {_kind_name(kind)}, got {_show(item)}", "fix that value")
        problem = _check_hyperparameter(parameter, value, settings)
        if problem:
            raise top.error(f"values[{i}]", problem[0], problem[1])
        if value in values:
            raise top.error(f"values[{i}]", f"repeats {value}", "list each value once")
        values.append(value)
    return Search(
        name=name,
        parameter=parameter,
        values=tuple(values),
        prefix=top.get("prefix", str, DEFAULT_PREFIX[parameter]),
        file=file,
        description=top.get("description", str, ""),
    )


def _check_hyperparameter(parameter: str, value: float, settings: Settings) -> tuple[str, str] | None:
    if parameter == "lr" and value <= 0:
        return f"is {value}; a learning rate must be > 0", "use a positive learning rate such as 1e-5"
    if parameter == "finetune_steps" and value < 0:
        return f"is {value}; steps cannot be negative", "use 0 or more steps"
    if parameter == "condition_frames":
        if value < 1:
            return f"is {value}; at least one frame must condition the model", "use 1 or more"
        if value >= settings.data.num_frames:
            return (f"is {value} but videos have data.num_frames {settings.data.num_frames}",
                    "condition on fewer frames than the video has, or raise data.num_frames in base.yaml")
    return None


def load_sweep(config_dir: Path) -> SweepConfig:
    """Read `base.yaml` and every `*_search.yaml` beside it."""
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        raise ConfigError(
            f"{config_dir}: no such config folder: run hparray from the project folder or pass --config-dir"
        )
    settings = load_settings(config_dir)
    searches = {}
    for file in sorted(config_dir.glob("*_search.yaml")):
        search = load_search(file, settings)
        searches[search.name] = search
    if not searches:
        raise ConfigError(f"{config_dir}: no *_search.yaml files: add one, e.g. lr_search.yaml")
    return SweepConfig(settings=settings, searches=searches)


def write_starter_configs(project: Path, force: bool = False) -> list[Path]:
    """Copy the shipped, commented configs (base.yaml and the three searches) into
    `project/configs/`; refuses to overwrite a file unless `force`. Returns the files written."""
    from hparray import resources

    shipped = sorted((f for f in resources.configs().iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    target = Path(project) / "configs"
    existing = [target / f.name for f in shipped if (target / f.name).exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists: edit it, or pass --force to overwrite the starter configs")
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for f in shipped:
            (target / f.name).write_text(f.read_text())
            written.append(target / f.name)
    except OSError as exc:
        raise ConfigError(f"cannot write {target} ({exc.strerror}): choose a folder you can write") from None
    return written


def format_value(value: float | int) -> str:
    """A value as it appears in config names: 1e-06 -> 1e-6, 0.0001 -> 1e-4, 2.5e-05 -> 2.5e-5, 22 -> 22."""
    if isinstance(value, int):
        return str(value)
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
