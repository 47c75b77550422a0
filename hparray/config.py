"""Sweep configuration: `configs/base.yaml` plus one `<search>_search.yaml` per searched factor.

One pydantic model per section is both the schema and the defaults (`extra="forbid"`, typed
fields with bounds); `load_settings` turns the first problem into one line naming the file, the
key and the fix, so a typo costs a second at the terminal, not a GPU-hour on the cluster. Each
Slurm setting that becomes an `#SBATCH` line says which, once, where it is declared.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from hparray.errors import ConfigError
from hparray.fields import (
    Bool,
    Float,
    Int,
    Section,
    Strings,
    Text,
    as_integer,
    as_number,
    as_text,
    fix_note,
    problem_error,
    show_value,
    slurm_seconds,
)
from hparray.metrics import METRICS

HYPERPARAMETERS = ("lr", "condition_frames", "finetune_steps")

DEFAULT_PREFIX = {"lr": "lr", "condition_frames": "cf", "finetune_steps": "steps"}


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



# ---------------------------------------------------------------- base.yaml, one model per section


class Baseline(Section):
    """The point every search varies one factor around."""

    lr: Float = Field(gt=0, json_schema_extra=fix_note("use a positive learning rate such as 1e-5"))
    condition_frames: Int = Field(ge=1, json_schema_extra=fix_note("condition on at least 1 frame"))
    finetune_steps: Int = Field(ge=0, json_schema_extra=fix_note("use 0 or more steps"))


class DataSettings(Section):
    """Where the videos come from, how many, and the geometry every runner sees."""

    source: Text = Field(
        json_schema_extra=fix_note("set data.source to 'sample', a folder of videos or a CSV manifest"))
    num_videos: Int = Field(20, ge=1)
    stratify_by: Literal["category"] = Field(
        "category", json_schema_extra=fix_note("stratify by 'category' (the subfolder or manifest column)"))
    num_frames: Int = Field(49, ge=2)
    height: Int = Field(64, ge=1)
    width: Int = Field(64, ge=1)


class RunnerSettings(Section):
    """Which runner produces the frames: `ltx`, `command` or `package.module:Class`."""

    name: Text = "ltx"
    command: Strings = Field(
        (), json_schema_extra=fix_note("give the argv as a list, e.g. [python, infer.py, '{condition_video}']"))
    timeout_s: Float = Field(3600.0, gt=0)
    start_timeout_s: Float = Field(1800.0, gt=0)  # resident: how long a server may take to load its model

    @model_validator(mode="after")
    def _command_given(self) -> RunnerSettings:
        if self.name in ("command", "resident") and not self.command:
            raise problem_error(f"is empty but runner.name is {self.name!r}",
                           "give the script's argv as a list, e.g. [python, infer.py, --video, '{video}']",
                           key="runner.command")
        return self


class ModelSettings(Section):
    """What the built-in LTX-Video runner loads and how it fine-tunes (other runners may ignore it)."""

    path: Text | None = None
    finetune: Literal["full", "lora"] = "full"
    lora_rank: Int = Field(8, ge=1)
    inference_steps: Int = Field(8, ge=1)
    guidance_scale: Float = Field(1.0, ge=1.0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trainable_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: Bool = False
    prompt: Text | None = None
    frame_rate: Int = Field(25, ge=1)

    @model_validator(mode="after")
    def _trainable_holds_the_updates(self) -> ModelSettings:
        if self.trainable_dtype not in ("float32", self.dtype):
            raise problem_error(f"is {self.trainable_dtype} with model.dtype {self.dtype}",
                           "keep the trainable weights in float32 (master weights), or in model.dtype",
                           key="model.trainable_dtype")
        if self.prompt is not None:
            from hparray.runners.ltx.text import check_template

            try:
                check_template(self.prompt)
            except ConfigError as err:
                raise problem_error(str(err).removeprefix(f"model.prompt {self.prompt!r} "),
                               "write a caption template such as 'a video of {category}'", key="model.prompt") from None
        return self


# The model settings that entered config hashes from the start; any later one enters a hash only
# when it differs from its default, so configs that do not use it keep their hashes (and results).
_HASHED_SINCE_0_1 = frozenset({"path", "finetune", "lora_rank", "inference_steps", "guidance_scale", "dtype",
                               "frame_rate"})
_NEVER_HASHED = frozenset({"gradient_checkpointing"})  # same gradients, less memory: same results


class TaskSettings(Section):
    """Budgets, estimates and heartbeats of the rows."""

    max_attempts: Int = Field(3, ge=1)
    max_losses: Int = Field(10, ge=1)
    circuit_breaker: Int = Field(3, ge=0)
    gpu_minutes_per_task: Float = Field(5.0, gt=0)
    baseline_gpu_minutes: Float = Field(1.0, gt=0)
    heartbeat_interval_s: Float = Field(30.0, gt=0)
    heartbeat_grace_s: Float = Field(300.0, gt=0)
    background_scoring: Bool = True

    @model_validator(mode="after")
    def _grace_outlasts_a_beat(self) -> TaskSettings:
        if self.heartbeat_grace_s < 2 * self.heartbeat_interval_s:
            raise problem_error(f"is {self.heartbeat_grace_s} s, under twice the heartbeat interval",
                           "make the grace at least 2x tasks.heartbeat_interval_s so one late beat is not a death",
                           key="tasks.heartbeat_grace_s")
        return self


class StoppingSettings(Section):
    """Opt-in sequential stopping (docs/statistics.md): a config significantly worse than its search's
    baseline has its pending rows skipped. In no config hash: turned off, `plan` resumes them."""

    enabled: Bool = False
    alpha: Float = Field(0.05, gt=0, lt=1, json_schema_extra=fix_note("use a small level such as 0.05"))
    min_videos: Int = Field(9, ge=2, json_schema_extra=fix_note("look after at least 2 paired videos, e.g. 9"))
    metric: Literal["psnr", "ssim", "lpips"] = "psnr"


def _slurm_time(value: Any) -> Any:
    value = as_text(value)
    try:
        slurm_seconds(value)
    except ValueError:
        raise problem_error(f"is not a Slurm time, got {value!r}",
                       "write it as Slurm does: MM, HH:MM:SS or D-HH:MM:SS") from None
    return value


def _sbatch(flag: str, **extra: Any) -> Any:
    """Field metadata: the `#SBATCH` line this setting becomes (`{}` is its value)."""
    return {"sbatch": flag, **extra}


class SlurmSettings(Section):
    """The job array. The fields with an `sbatch` line, in this order, are the script's resource
    directives (`directives()`): declared once here, rendered from here."""

    job_name: Text = Field("hparray", json_schema_extra=_sbatch("--job-name={}"))
    partition: Text | None = Field(None, json_schema_extra=_sbatch("--partition={}"))
    account: Text | None = Field(None, json_schema_extra=_sbatch("--account={}"))
    qos: Text | None = Field(None, json_schema_extra=_sbatch("--qos={}"))
    time: Annotated[str, BeforeValidator(_slurm_time)] = Field("04:00:00", json_schema_extra=_sbatch("--time={}"))
    gpus_per_task: Int = Field(1, ge=0, json_schema_extra=_sbatch("--gres=gpu:{}"))
    cpus_per_task: Int = Field(8, ge=1, json_schema_extra=_sbatch("--cpus-per-task={}"))
    mem_gb: Int = Field(64, ge=1, json_schema_extra=_sbatch("--mem={}G"))
    constraint: Text | None = Field(None, json_schema_extra=_sbatch("--constraint={}"))
    extra_directives: Strings = ()
    setup: Strings = ()
    gpu_memory_gib: Float | None = Field(None, gt=0)
    workers: Int = Field(8, ge=1)
    throttle: Int = Field(8, ge=1)
    signal_grace_s: Int = Field(300, ge=1)
    log_dir: Text = "logs/slurm"

    def directives(self) -> list[tuple[str, str, Any]]:
        """(setting, sbatch format, value) of every set resource directive, in declaration order
        (a None or 0 value means no such line: no partition named, no GPU asked for)."""
        lines = []
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            flag = extra.get("sbatch") if isinstance(extra, dict) else None
            value = getattr(self, name)
            if flag and value not in (None, 0):
                lines.append((name, str(flag), value))
        return lines


class Settings(Section):
    """The validated content of `configs/base.yaml` (and the folder it came from)."""

    seed: Int = 0
    baseline: Baseline
    data: DataSettings
    runner: RunnerSettings = RunnerSettings()
    model: ModelSettings = ModelSettings()
    metrics: tuple[str, ...] = METRICS
    tasks: TaskSettings = TaskSettings()
    slurm: SlurmSettings = SlurmSettings()
    stopping: StoppingSettings = StoppingSettings()
    output_dir: Text = "results"
    artifacts: Literal["lossless", "preview", "full", "none"] = "lossless"
    notify: Strings | None = Field(
        None, json_schema_extra=fix_note("give the command's argv as a list, e.g. [/path/to/notify.sh, --channel, x]"))
    config_dir: Path = Field(default=Path("configs"), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _metrics_known(cls, data: Any) -> Any:
        if isinstance(data, dict) and "metrics" in data:
            metrics = data["metrics"]
            if not isinstance(metrics, (list, tuple)):
                raise problem_error(f"must be a list, got {show_value(metrics)}", f"list some of {', '.join(METRICS)}",
                               key="metrics")
            if not metrics:
                raise problem_error("is empty", f"list at least one of {', '.join(METRICS)}", key="metrics")
            unknown = [m for m in metrics if m not in METRICS]
            if unknown:
                raise problem_error(f"contains {unknown[0]!r}", f"use some of {', '.join(METRICS)}", key="metrics")
            data = {**data, "metrics": tuple(metrics)}
        return data

    @model_validator(mode="after")
    def _frames_left_to_score(self) -> Settings:
        if self.baseline.condition_frames >= self.data.num_frames:
            raise problem_error(f"is {self.baseline.condition_frames} but videos have data.num_frames "
                           f"{self.data.num_frames}",
                           "condition on fewer frames than the video has, so some frames are left to score",
                           key="baseline.condition_frames")
        from hparray.runners.protocol import geometry_problem

        problem = geometry_problem(self.runner.name, self.data.height, self.data.width)
        if problem:
            raise problem_error(problem[1], problem[2], key=problem[0])
        return self

    @model_validator(mode="after")
    def _notify_has_a_command(self) -> Settings:
        if self.notify is not None and (not self.notify or not self.notify[0].strip()):
            raise problem_error("names no command" if self.notify else "is empty",
                                "give the command's argv as a list, e.g. [/path/to/notify.sh, --channel, x], "
                                "or leave notify out", key="notify")
        return self

    @model_validator(mode="after")
    def _stopping_can_stop(self) -> Settings:
        stopping, videos = self.stopping, self.data.num_videos
        if stopping.enabled and stopping.metric not in self.metrics:
            raise problem_error(f"is {stopping.metric} but metrics does not score it",
                                f"use one of {', '.join(self.metrics)} or add it to metrics", key="stopping.metric")
        if stopping.enabled and stopping.min_videos > videos:
            raise problem_error(f"is {stopping.min_videos} but data.num_videos is {videos}",
                                "look after at most data.num_videos videos", key="stopping.min_videos")
        boundary = stopping.alpha / max(1, videos - stopping.min_videos + 1)
        if stopping.enabled and 0.5 ** videos >= boundary:  # the exact one-sided Wilcoxon p is at least 2^-n
            raise problem_error(f"can never stop a config: with {videos} videos the smallest p is {0.5 ** videos:.3g}, "
                                f"not below the boundary {boundary:.3g}",
                                "plan more videos, raise stopping.alpha or stopping.min_videos", key="stopping")
        return self

    def experiment_fingerprint(self) -> dict[str, Any]:
        """What, besides the hyperparameters, decides a task's result; part of every config hash."""
        model = self.model.model_dump()
        defaults = ModelSettings().model_dump()
        model = {k: v for k, v in model.items()
                 if k not in _NEVER_HASHED and (k in _HASHED_SINCE_0_1 or v != defaults[k])}
        if self.model.dtype != "float32":  # before fp32 master weights, such rows trained in pure low precision
            model["trainable_dtype"] = self.model.trainable_dtype
        return {
            "runner": {"name": self.runner.name, "command": list(self.runner.command)},
            "model": dict(sorted(model.items())),
            "frames": [self.data.num_frames, self.data.height, self.data.width],
            "seed": self.seed,
        }

    def output_path(self) -> Path:
        """Artifacts folder; relative paths are relative to the project folder (configs' parent)."""
        path = Path(self.output_dir)
        return path if path.is_absolute() else self.config_dir.parent / path


# ---------------------------------------------------------------- search files


@dataclass(frozen=True)
class Search:
    """One factor varied around the baseline, from `<name>_search.yaml`."""

    name: str
    parameter: str
    values: tuple[float | int, ...]
    prefix: str
    file: Path
    description: str = ""


class SearchFile(Section):
    """The shape of a `<name>_search.yaml`; its values are checked against the baseline after."""

    search: Text | None = None
    parameter: Text = Field(json_schema_extra=fix_note("name the factor, e.g. parameter: lr"))
    values: list[Any] = Field(json_schema_extra=fix_note("list the values to try, e.g. values: [1e-6, 1e-5, 1e-4]"))
    prefix: Text | None = None
    description: Text = ""


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


# ---------------------------------------------------------------- loading


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


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel], str] | None:
    """The section model and field name a validation error's location points at."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        info = current.model_fields.get(str(part))
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        current = annotation
    return current, str(loc[-1])


def explain(error: ValidationError, file: Path, model: type[BaseModel]) -> ConfigError:
    """A pydantic ValidationError as today's one line: `file: key problem: fix`."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    kind, ctx, given = first["type"], first.get("ctx") or {}, first.get("input")
    key = ".".join(loc)
    where = _model_at(model, loc) if loc else None
    info = where[0].model_fields.get(where[1]) if where else None
    extra = info.json_schema_extra if info is not None else None
    fix = str(extra.get("fix", "")) if isinstance(extra, dict) else ""
    if kind == "hparray":
        problem, fix, key = ctx["problem"], ctx.get("fix") or fix, ctx.get("key") or key
    elif kind == "missing":
        problem, fix = "is missing", fix or f"add {key} to {file.name}"
    elif kind == "extra_forbidden":
        known = list(where[0].model_fields) if where else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        problem = "is not a known key"
        fix = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(known)}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        problem, fix = f"must be {sign} {bound}, got {given}", fix or "change the value"
    elif kind == "literal_error":
        problem, fix = f"must be {ctx['expected']}, got {given!r}", fix or "use one of those"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        problem, fix = f"must be a mapping of keys, got {show_value(given)}", "indent the keys under it"
    else:
        problem, fix = f"{first['msg'].lower()}, got {show_value(given)}", fix or "change the value"
    return ConfigError(f"{file}: {key or 'top level'} {problem}: {fix or 'change the value'}")


def load_settings(config_dir: Path) -> Settings:
    """Read and validate `base.yaml` in `config_dir`."""
    file = config_dir / "base.yaml"
    data = _read_yaml(file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping of keys, got {show_value(data)}: "
                          "indent the keys under it")
    if "config_dir" in data:
        raise ConfigError(f"{file}: config_dir is not a known key: it is where base.yaml is, not a setting")
    try:
        return Settings.model_validate({**data, "config_dir": config_dir.resolve()})
    except ValidationError as err:
        raise explain(err, file, Settings) from None


def load_search(file: Path, settings: Settings) -> Search:
    """Read one `<name>_search.yaml` and check its values against the baseline."""
    name = file.name[: -len("_search.yaml")]
    data = _read_yaml(file)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping of keys, got {show_value(data)}: "
                          "indent the keys under it")
    try:
        raw = SearchFile.model_validate(data)
    except ValidationError as err:
        raise explain(err, file, SearchFile) from None
    declared = raw.search or name
    if declared != name:
        raise ConfigError(f"{file}: search is {declared!r} but the file is named {file.name}: "
                          f"rename the file to {declared}_search.yaml or set search: {name}")
    parameter = raw.parameter
    if parameter not in HYPERPARAMETERS:
        raise ConfigError(f"{file}: parameter is {parameter!r}, which the baseline in base.yaml does not have: "
                          f"vary one of {', '.join(HYPERPARAMETERS)}")
    if not raw.values:
        raise ConfigError(f"{file}: values is empty: list at least one value to try")
    values: list[float | int] = []
    for i, item in enumerate(raw.values):
        try:
            value: float | int = as_number(item) if parameter == "lr" else as_integer(item)
        except PydanticCustomError as err:
            raise ConfigError(f"{file}: values[{i}] {err.context['problem'] if err.context else err}: "
                              "fix that value") from None
        problem = _check_hyperparameter(parameter, value, settings)
        if problem:
            raise ConfigError(f"{file}: values[{i}] {problem[0]}: {problem[1]}")
        if value in values:
            raise ConfigError(f"{file}: values[{i}] repeats {value}: list each value once")
        values.append(value)
    return Search(name=name, parameter=parameter, values=tuple(values),
                  prefix=raw.prefix or DEFAULT_PREFIX[parameter], file=file, description=raw.description)


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


def format_value(value: float | int) -> str:
    """A value as it appears in config names: 1e-06 -> 1e-6, 0.0001 -> 1e-4, 2.5e-05 -> 2.5e-5, 22 -> 22."""
    if isinstance(value, int):
        return str(value)
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
