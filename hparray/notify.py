"""`notify:` in base.yaml: a command (an argv list, run with no shell) that hears when the sweep has
nothing left to run and when a row fails for good, with a JSON summary on its stdin.

Each event is sent once, whoever sees it: the sender first wins the event's key in the store
(`store.notifications`), so N workers that run out of work together send one message. A command
that fails, hangs or is missing is logged and never reaches the worker: losing a message must
not lose a row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from hparray import failpoints
from hparray.config import Settings
from hparray.environment import this_host
from hparray.store import Store, redact_url
from hparray.store import notifications as marks

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT_S = 60.0
"""How long the command may take; then it is killed (and the event stays sent)."""
FAILED_SHOWN = 50
"""Failed rows listed in a summary, with their last error."""
HOLD_ENV = "HPARRAY_FAILPOINT_NOTIFY_HOLD"
"""A failpoint (hparray.failpoints) where a process about to ask whether the sweep is complete leaves
`ready-<pid>` and waits (a minute at most), so that a test makes N workers ask at the same moment."""


def sweep_finished(settings: Settings, store: Store, sender: str, now: float | None = None) -> bool:
    """Run the command once the sweep has nothing left to run, if this caller is the first to see
    it (workers that found nothing to claim, `submit --local` at the end). True when it was sent."""
    if not settings.notify:
        return False
    failpoints.hold(HOLD_ENV, f"ready-{os.getpid()}", timeout_s=60.0)
    now = time.time() if now is None else now
    try:
        if not marks.claim_sweep_complete(store, sender, now):
            return False
        summary = summary_json(settings, store, "sweep_complete", sender, now)
    except Exception as err:  # never into the worker: a lost message must not lose a row
        log.warning("notify: could not tell whether the sweep is complete: %s", err)
        return False
    return send(settings, summary)


def row_failed(settings: Settings, store: Store, task_id: int, sender: str, now: float | None = None) -> bool:
    """Run the command for a row that failed for good (once per failure). True when it was sent."""
    if not settings.notify:
        return False
    now = time.time() if now is None else now
    try:
        if not marks.claim_row_failed(store, task_id, sender, now):
            return False
        summary = summary_json(settings, store, "row_failed", sender, now, task_id=task_id)
    except Exception as err:
        log.warning("notify: could not report failed row %s: %s", task_id, err)
        return False
    return send(settings, summary)


def summary_json(settings: Settings, store: Store, event: str, sender: str, now: float,
                 task_id: int | None = None) -> dict[str, Any]:
    """What the command reads on stdin: the event, the rows by status, the failed rows with their
    last error, how long the sweep has run, and the command that writes its report."""
    counts = store.task_counts()
    rows = {**dataclasses.asdict(counts), "total": counts.total}
    failed = [dataclasses.asdict(row) for row in store.failed_rows(FAILED_SHOWN)]
    started, _ended = marks.sweep_span(store)
    project = settings.config_dir.resolve().parent
    summary: dict[str, Any] = {
        "event": event,
        "message": "",
        "database": redact_url(store.url),
        "project": str(project),
        "rows": rows,
        "failed": failed,
        "failed_total": counts.failed,
        "started_at": started,
        "elapsed_s": None if started is None else round(now - started, 3),
        "report": shlex.join(["hparray", "--config-dir", str(settings.config_dir.resolve()),
                              "--db", redact_url(store.url), "report"]),
        "sender": sender,
        "host": this_host(),
        "sent_at": now,
    }
    state = (f"{counts.done} done, {counts.diverged} diverged, {counts.failed} failed of {counts.total} rows"
             + (f", {counts.blocked} blocked behind failed rows" if counts.blocked else ""))
    if event == "row_failed" and task_id is not None:
        row = marks.failed_row(store, task_id)
        summary["row"] = None if row is None else dataclasses.asdict(row)
        what = f"{row.config_name} {row.video}" if row is not None else f"#{task_id}"
        first = (row.error or "").splitlines()[0] if row is not None and row.error else "no error kept"
        summary["message"] = f"row {what} failed for good: {first} ({state})"
    else:
        summary["message"] = f"sweep complete: {state}"
    return summary


def send(settings: Settings, summary: dict[str, Any]) -> bool:
    """Run `settings.notify` with `summary` as JSON on stdin (no shell: each element is one argv
    string, quotes and `;` included), from the project folder. Never raises; True on exit 0."""
    argv = list(settings.notify or ())
    if not argv:
        return False
    env = {**os.environ, "HPARRAY_NOTIFY_EVENT": str(summary.get("event", ""))}
    cwd: Path = settings.config_dir.resolve().parent
    payload = json.dumps(summary, default=str) + "\n"
    try:
        done = subprocess.run(argv, input=payload.encode(), capture_output=True, timeout=NOTIFY_TIMEOUT_S,
                              cwd=cwd if cwd.is_dir() else None, env=env, shell=False, check=False)
    except subprocess.TimeoutExpired:
        log.warning("notify: %s did not finish within %.0f s and was killed", argv[0], NOTIFY_TIMEOUT_S)
        return False
    except OSError as err:
        log.warning("notify: cannot run %s: %s (fix `notify:` in base.yaml)", argv[0], err)
        return False
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        log.warning("notify: %s exited with %d: %s", argv[0], done.returncode, tail[0][:300])
        return False
    log.info("notify: sent %s (%s)", summary.get("event"), summary.get("message"))
    return True
