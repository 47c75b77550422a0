"""`notify:`: the setting is refused in one line unless it is an argv list, and the command runs with
no shell (what it gets is exactly what was written), its failures logged and never raised."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hparray import notify
from hparray.config import Settings, load_settings
from hparray.errors import ConfigError
from tests.conftest import REPO, Project

SINK = REPO / "tests" / "support" / "notify_sink.py"


def settings_with(project: Project, value: Any) -> Settings:
    base = project.base()
    base["notify"] = value
    project.write_base(base)
    return load_settings(project.config_dir)


@pytest.mark.parametrize("value, message", [
    ([], "notify is empty: give the command's argv as a list"),
    ("notify.sh --now", "notify must be a list, got 'notify.sh --now'"),
    ([""], "notify names no command"),
    (["notify.sh", 3], "notify must be a list of strings"),
])
def test_notify_must_be_an_argv_list(make_project: Callable[..., Project], value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_with(make_project(), value)


def test_notify_is_off_unless_set(make_project: Callable[..., Project]) -> None:
    settings = load_settings(make_project().config_dir)
    assert settings.notify is None
    assert notify.sweep_finished(settings, object(), "w") is False  # type: ignore[arg-type]  # never touches the store


def test_the_command_gets_its_argv_and_the_summary_exactly_with_no_shell(
        make_project: Callable[..., Project], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    hostile = f"a 'b' \"c\"; $(touch {tmp_path}/pwned) `touch {tmp_path}/pwned2` | > {tmp_path}/pwned3 \\"
    settings = settings_with(make_project(), [sys.executable, str(SINK), str(inbox), hostile, "--flag"])
    summary = {"event": "row_failed", "message": hostile, "failed": [{"error": hostile + "\nline 2"}]}
    assert notify.send(settings, summary)
    [message] = [json.loads(p.read_text()) for p in inbox.glob("msg-*.json")]
    assert message["argv"] == [hostile, "--flag"]
    assert message["stdin"] == summary and message["event"] == "row_failed"
    assert not list(tmp_path.glob("pwned*"))


def test_a_failing_missing_or_hanging_command_is_logged_never_raised(
        make_project: Callable[..., Project], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    project = make_project()
    caplog.set_level(logging.WARNING, logger="hparray.notify")
    assert not notify.send(settings_with(project, [str(project.root / "no-such-script")]), {"event": "x"})
    assert "cannot run" in caplog.text
    failing = [sys.executable, "-c", "import sys; print('refused by the chat server', file=sys.stderr); sys.exit(4)"]
    assert not notify.send(settings_with(project, failing), {"event": "x"})
    assert "exited with 4: refused by the chat server" in caplog.text
    monkeypatch.setattr(notify, "NOTIFY_TIMEOUT_S", 0.5)
    started = time.monotonic()
    assert not notify.send(settings_with(project, [sys.executable, "-c", "import time; time.sleep(30)"]), {})
    assert time.monotonic() - started < 15 and "did not finish within" in caplog.text
    # A store that cannot answer: the worker hears nothing of it.
    assert notify.sweep_finished(settings_with(project, failing), object(), "w") is False  # type: ignore[arg-type]
    assert notify.row_failed(settings_with(project, failing), object(), 1, "w") is False  # type: ignore[arg-type]
