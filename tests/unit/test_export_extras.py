"""Without a tracker's client, `hparray export` says in one line which extra to install, exits 2,
and does so before it reads any config or database."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hparray.cli import main
from hparray.export.mlflow import tracking_uri

TRACKERS = {"mlflow": "MLflow", "tensorboard": "TensorBoard", "wandb": "W&B"}


@pytest.mark.parametrize("extra", sorted(TRACKERS))
def test_a_missing_client_names_its_extra(extra: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, extra, None)  # `import <extra>` now raises ImportError
    monkeypatch.chdir(tmp_path)  # no configs/, no results.db here
    with pytest.raises(SystemExit) as stopped:
        main(["export", extra])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {TRACKERS[extra]} export needs the {extra} extra: "
                               f"pip install 'hparray[{extra}]'"), err
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "results.db").exists()


def test_a_folder_becomes_a_file_uri_and_uris_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking_uri("mlruns") == (tmp_path / "mlruns").resolve().as_uri()
    assert tracking_uri(tmp_path / "a b") == (tmp_path / "a b").as_uri()
    for uri in ("http://mlflow:5000", "sqlite:///mlflow.db", "file:///tmp/mlruns", "databricks"):
        assert tracking_uri(uri) == uri
