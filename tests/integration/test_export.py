"""`hparray export` against the trackers' own files, read back with the trackers' own readers: a
real MLflow file store (MlflowClient), TensorBoard event files (tensorboard's EventAccumulator) and
W&B offline runs (their record log, parsed with wandb's protobuf messages). The values must equal
summary.json's, and a second export must change no run count.

One sweep serves every test: an lr and a steps search sharing the baseline config, planned and
run part-way through the real worker, exported to all three trackers (checked against the
report's numbers, computed by its own functions); then finished, reported with `hparray report`
and exported again into the same places (checked against the summary.json it wrote).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hparray.cli import main
from hparray.export import collect
from hparray.export.mlflow import export_mlflow
from hparray.export.tensorboard import export_tensorboard
from hparray.report import per_video_csv
from hparray.report.compute import compute
from hparray.store import Store
from tests.conftest import Project, base_config, write_videos

LR_VALUES = [1e-6, 1e-5, 1e-4]
STEPS_VALUES = [1, 2, 4]  # the baseline's finetune_steps is 2: lr_1e-5 and steps_2 are one config
VIDEOS = 4
METRICS = ["psnr", "ssim"]
CONFIGS = 6  # 5 fine-tune configs (the baseline once) + the un-fine-tuned inference
# The un-fine-tuned rows first, then video by video: one video for every config, two for some.
PARTIAL_TASKS = VIDEOS + 5 + 2


@dataclass
class Snapshot:
    """What each tracker holds after one round of exports, and the summary.json they came from."""

    summary: dict[str, Any]
    per_video: list[dict[str, str]]
    printed: dict[str, str]
    mlflow: dict[str, dict[str, Any]]  # config hash -> run
    tensorboard: dict[str, dict[str, Any]]  # run folder -> run
    wandb: dict[str, dict[str, Any]]  # run id -> run


@dataclass
class Exported:
    project: Project
    first: Snapshot  # after the partial sweep
    second: Snapshot  # after it finished


def _ok(run: subprocess.CompletedProcess, what: str) -> None:
    assert run.returncode == 0, f"{what} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"


def _export(project: Project, *argv: str) -> str:
    """The real command, in this process (the trackers' clients import once); what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--config-dir", str(project.config_dir), "--db", str(project.db), "export", *argv])
    return printed.getvalue()


def _report(project: Project, files: bool) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """summary.json and per_video.csv: as `hparray report` writes them, or (quicker, without its plots
    and page) as its own functions compute them."""
    if files:
        _ok(project.run("report"), "report")
        out = project.root / "results"
        summary, table = json.loads((out / "summary.json").read_text()), (out / "per_video.csv").read_text()
    else:
        store = Store.open(str(project.db), create=False)
        report, rows = compute(store)
        summary, table = json.loads(json.dumps(report.summary_json())), per_video_csv(rows)
        store.close()
    return summary, list(csv.DictReader(io.StringIO(table)))


def _round(project: Project, files: bool) -> Snapshot:
    summary, per_video = _report(project, files)
    trackers = project.root / "trackers"
    printed = {
        "mlflow": _export(project, "mlflow", "--uri", str(trackers / "mlruns")),
        "tensorboard": _export(project, "tensorboard", "--logdir", str(trackers / "tb")),
        "wandb": _export(project, "wandb", "--dir", str(trackers / "wandb"), "--project", "sweep"),
    }
    return Snapshot(summary, per_video, printed,
                    read_mlflow(trackers / "mlruns", project.root.name), read_tensorboard(trackers / "tb"),
                    read_wandb(trackers / "wandb" / "wandb"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("export") / "ltx-sweep"
    (root / "configs").mkdir(parents=True)
    write_videos(root / "videos", per_category=VIDEOS // 2)
    project = Project(root)
    project.write_base(base_config("videos", metrics=METRICS, **{"data.num_videos": VIDEOS}))
    project.write_search("lr", "lr", LR_VALUES)
    project.write_search("steps", "finetune_steps", STEPS_VALUES)
    _ok(project.run("plan", "--search", "all"), "plan")
    _ok(project.run("worker", "--max-tasks", str(PARTIAL_TASKS)), "worker --max-tasks")
    first = _round(project, files=False)
    _ok(project.run("worker"), "worker")
    return Exported(project, first, _round(project, files=True))


# ---------------------------------------------------------------- reading back, with the trackers' readers


def read_mlflow(folder: Path, experiment: str) -> dict[str, dict[str, Any]]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=folder.resolve().as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = {}
    for run in client.search_runs([found.experiment_id]):
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        local = client.download_artifacts(run.info.run_id, "per_video.csv", str(folder.parent / "downloads"))
        with open(local, newline="") as handle:
            table = list(csv.DictReader(handle))
        key = run.data.tags["hparray.config_hash"]
        assert key not in runs, f"two MLflow runs carry config {key}"
        runs[key] = {"id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                     "metrics": run.data.metrics, "params": run.data.params, "tags": run.data.tags,
                     "artifacts": artifacts, "per_video": table}
    filtered = client.search_runs([found.experiment_id], "tags.`hparray.baseline` = 'true'")
    runs[""] = {"baseline_filter": [run.info.run_id for run in filtered]}
    return runs


def read_tensorboard(logdir: Path) -> dict[str, dict[str, Any]]:
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    def load(folder: Path) -> Any:
        accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        return accumulator

    root = load(logdir)
    experiment = metadata.parse_experiment_plugin_data(root.PluginTagToContent("hparams")["_hparams_/experiment"])
    runs: dict[str, dict[str, Any]] = {"": {"events": len(list(logdir.glob("events.out.tfevents.*"))),
                                            "hparams": [h.name for h in experiment.hparam_infos],
                                            "metrics": [m.name.tag for m in experiment.metric_infos]}}
    for folder in sorted(p for p in logdir.iterdir() if p.is_dir()):
        run = load(folder)
        content = run.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = metadata.parse_session_start_info_plugin_data(content)
        hparams = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
        scalars = {tag: [(event.step, event.value) for event in run.Scalars(tag)] for tag in run.Tags()["scalars"]}
        runs[folder.name] = {"events": len(list(folder.glob("events.out.tfevents.*"))), "hparams": hparams,
                             "trial": start.group_name, "scalars": scalars,
                             "hash": json.loads((folder / "hparray_run.json").read_text())["config_hash"]}
    return runs


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file: a 7-byte header (':W&B', magic, version), then LevelDB-log
    records (crc32, length, type) in 32 KiB blocks, each a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        else:  # FIRST, MIDDLE
            pending += chunk


def read_wandb(folder: Path) -> dict[str, dict[str, Any]]:
    runs = {}
    for run_dir in sorted(folder.glob("offline-run-*")):
        config: dict[str, Any] = {}
        summary: dict[str, Any] = {}
        header: Any = None
        for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                header = record.run
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "summary":
                summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
        assert header is not None and header.run_id not in runs, run_dir
        runs[header.run_id] = {"name": header.display_name, "project": header.project, "group": header.run_group,
                               "tags": list(header.tags), "config": config, "summary": summary,
                               "files": {p.name for p in (run_dir / "files").iterdir()}}
    return runs


# ---------------------------------------------------------------- what summary.json says


def entries(summary: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """config hash -> [(search, its entry)] in summary.json's order."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    groups = [*summary["searches"].items(), ("baseline_inference", {"configs": summary["baseline_inference"]})]
    for search, report in groups:
        for entry in report["configs"].values():
            found.setdefault(entry["hash"], []).append((search, entry))
    return found


def at_path(entry: dict[str, Any], name: str) -> Any:
    """The number an exported name points at in a summary.json config entry: `psnr/mean` is
    entry["metrics"]["psnr"]["mean"], `vs_baseline/psnr/p_holm` entry["vs_baseline"]["psnr"]["p_holm"]."""
    node = entry["metrics"] if name.split("/")[0] in ("psnr", "ssim", "lpips") else entry
    for part in name.split("/"):
        node = node[part]
    return node


def expected_numbers(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers every export must carry: each measured metric's estimate and comparisons."""
    numbers = {}
    for metric in METRICS:
        for stat, value in entry["metrics"][metric].items():
            if value is not None:
                numbers[f"{metric}/{stat}"] = float(value)
        for reference in ("vs_baseline", "vs_no_finetune"):
            for stat, value in entry[reference].get(metric, {}).items():
                if isinstance(value, (int, float)):
                    numbers[f"{reference}/{metric}/{stat}"] = float(value)
    return numbers


def hyperparameters(entry: dict[str, Any], search: str) -> dict[str, Any]:
    """From the project's configs: the baseline lr 1e-5, condition_frames 4, finetune_steps 2, with the
    search's own parameter set to the config's value."""
    if search == "baseline_inference":
        return {"condition_frames": 4, "finetune_steps": 0, "kind": "no_finetune"}
    found = {"lr": 1e-5, "condition_frames": 4, "finetune_steps": 2, "kind": "finetune"}
    found[entry["parameter"]] = entry["value"] if entry["parameter"] == "lr" else int(entry["value"])
    return found


def each_config(snapshot: Snapshot) -> Iterator[tuple[str, str, dict[str, Any], list[tuple[str, dict[str, Any]]]]]:
    """(hash, primary search, its entry, every membership) per distinct config."""
    for key, members in entries(snapshot.summary).items():
        search, entry = members[0]
        yield key, search, entry, members


# ---------------------------------------------------------------- MLflow


@pytest.mark.parametrize("which", ["first", "second"])
def test_mlflow_runs_hold_summary_json_numbers(exported: Exported, which: str) -> None:
    snapshot: Snapshot = getattr(exported, which)
    runs = dict(snapshot.mlflow)
    baseline_filter = runs.pop("")["baseline_filter"]
    assert len(runs) == CONFIGS
    for key, search, entry, members in each_config(snapshot):
        run = runs[key]
        names = {s: e["name"] for s, e in members}
        assert run["name"] == "=".join(names.values())
        for name, value in run["metrics"].items():
            assert value == at_path(entry, name), f"{run['name']} {name}"
        expected = expected_numbers(entry)
        assert {name: run["metrics"].get(name) for name in expected} == expected
        hp = hyperparameters(entry, search)
        assert {name: float(value) if name == "lr" else value for name, value in run["params"].items()} == \
            {name: str(value) if name != "lr" else value for name, value in hp.items()}
        tags = run["tags"]
        assert tags["hparray.search"] == ",".join(names)
        assert all(tags[f"hparray.search.{s}"] == name for s, name in names.items())
        assert tags["hparray.baseline"] == str(any(e["is_baseline"] for _, e in members)).lower()
        assert tags["hparray.status"] == entry["status"]
        assert tags["hparray.partial"] == str(entry["partial"]).lower()
        assert run["status"] == ("RUNNING" if entry["partial"] else "FINISHED")
        assert {"per_video.csv", "summary.json"} <= run["artifacts"]
        assert run["per_video"] == [r for r in snapshot.per_video if r["search"] == search
                                    and r["config"] == entry["name"]]
        assert len(run["per_video"]) == VIDEOS
    baseline = [run for run in runs.values() if run["tags"]["hparray.baseline"] == "true"]
    assert len(baseline) == 1 and baseline[0]["tags"]["hparray.search"] == "lr,steps"
    assert baseline_filter == [baseline[0]["id"]]
    for search, report in snapshot.summary["searches"].items():
        for metric, best in report["best"].items():
            run = next(r for r in runs.values() if r["tags"].get(f"hparray.search.{search}") == best["config"])
            verdict = "baseline" if best["is_baseline"] else "significant" if best["significant"] else "not significant"
            assert run["tags"][f"hparray.best.{search}.{metric}"] == verdict


def test_a_second_mlflow_export_updates_the_same_runs(exported: Exported) -> None:
    first, second = exported.first, exported.second
    assert first.printed["mlflow"].startswith(f"MLflow: {CONFIGS} runs ({CONFIGS} created, 0 updated)")
    assert second.printed["mlflow"].startswith(f"MLflow: {CONFIGS} runs (0 created, {CONFIGS} updated)")
    ids = [{key: run["id"] for key, run in s.mlflow.items() if key} for s in (first, second)]
    assert len(ids[0]) == CONFIGS and ids[0] == ids[1]
    assert first.summary["partial"] and not second.summary["partial"]
    assert any(first.mlflow[k]["metrics"]["psnr/mean"] != second.mlflow[k]["metrics"]["psnr/mean"]
               for k in ids[0]), "the second export did not update the numbers"


# ---------------------------------------------------------------- TensorBoard


@pytest.mark.parametrize("which", ["first", "second"])
def test_tensorboard_hparams_and_scalars_hold_summary_json_numbers(exported: Exported, which: str) -> None:
    snapshot: Snapshot = getattr(exported, which)
    root = snapshot.tensorboard.pop("", None) or {}
    try:
        assert root["events"] == 1
        assert set(root["hparams"]) == {"lr", "condition_frames", "finetune_steps", "kind", "search", "baseline"}
        assert {"psnr/mean", "psnr/ci_low", "psnr/ci_high", "vs_baseline/psnr/mean_diff"} <= set(root["metrics"])
        assert len(snapshot.tensorboard) == CONFIGS
        by_hash = {run["hash"]: (folder, run) for folder, run in snapshot.tensorboard.items()}
        for key, search, entry, members in each_config(snapshot):
            folder, run = by_hash[key]
            names = "=".join(e["name"] for _, e in members)
            assert folder == run["trial"] == names
            assert run["events"] == 1
            hp = hyperparameters(entry, search)
            hp.update(search=",".join(s for s, _ in members), baseline=any(e["is_baseline"] for _, e in members))
            assert run["hparams"] == {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                                      for k, v in hp.items()}
            for name, points in run["scalars"].items():
                assert points == [(0, pytest.approx(float(np.float32(at_path(entry, name))), rel=1e-7))], name
            for name, value in expected_numbers(entry).items():
                assert run["scalars"][name][0][1] == pytest.approx(value, rel=1e-6, abs=1e-30), name
    finally:
        snapshot.tensorboard[""] = root


def test_a_second_tensorboard_export_rewrites_the_same_runs(exported: Exported) -> None:
    first, second = exported.first, exported.second
    assert sorted(first.tensorboard) == sorted(second.tensorboard)
    assert second.printed["tensorboard"].startswith(f"TensorBoard: {CONFIGS} runs (0 created, {CONFIGS} updated)")


def test_a_renamed_config_keeps_its_run(exported: Exported, tmp_path: Path) -> None:
    """The shared baseline's name grows when a search is planned later: its run is found by hash."""
    store = Store.open(str(exported.project.db), create=False)
    export = collect(store, "renamed")
    store.close()
    renamed = dataclasses.replace(export, runs=[dataclasses.replace(run, name=f"cf_4={run.name}") if run.baseline
                                                else run for run in export.runs])
    for version in (export, renamed):
        export_tensorboard(version, tmp_path / "tb")
        export_mlflow(version, tmp_path / "mlruns")
    folders = read_tensorboard(tmp_path / "tb")
    runs = read_mlflow(tmp_path / "mlruns", "renamed")
    for found in (folders, runs):
        found.pop("")
    assert len(folders) == len(runs) == CONFIGS
    assert "cf_4=lr_1e-5=steps_2" in folders and "lr_1e-5=steps_2" not in folders
    assert sorted(run["name"] for run in runs.values() if run["tags"]["hparray.baseline"] == "true") == [
        "cf_4=lr_1e-5=steps_2"]


# ---------------------------------------------------------------- W&B (offline)


@pytest.mark.parametrize("which", ["first", "second"])
def test_wandb_offline_runs_hold_summary_json_numbers(exported: Exported, which: str) -> None:
    snapshot: Snapshot = getattr(exported, which)
    assert len(snapshot.wandb) == CONFIGS
    by_hash = {run["config"]["config_hash"]: run for run in snapshot.wandb.values()}
    for key, search, entry, members in each_config(snapshot):
        run = by_hash[key]
        assert run["name"] == "=".join(e["name"] for _, e in members)
        assert (run["project"], run["group"]) == ("sweep", exported.project.root.name)
        assert {k: run["config"][k] for k in hyperparameters(entry, search)} == hyperparameters(entry, search)
        assert run["config"]["searches"] == [s for s, _ in members]
        for name, value in expected_numbers(entry).items():
            assert run["summary"][name] == value, name
        assert {f"search:{s}" for s, _ in members} <= set(run["tags"])
        assert ("baseline" in run["tags"]) == any(e["is_baseline"] for _, e in members)
        assert f"kind:{hyperparameters(entry, search)['kind']}" in run["tags"]
        assert {"per_video.csv", "summary.json"} <= run["files"]


def test_a_second_wandb_export_keeps_the_run_ids(exported: Exported) -> None:
    assert sorted(exported.first.wandb) == sorted(exported.second.wandb)
    assert exported.second.printed["wandb"].startswith(f"W&B: {CONFIGS} runs (0 created, {CONFIGS} updated)")
