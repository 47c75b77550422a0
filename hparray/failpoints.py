"""Failpoints for fault tests: a folder, named by an environment variable, where a process leaves a
mark and then waits until `go` exists there or it takes one `ticket-*` file, so a test can act on a
process that is certainly at that point (no guess of how long work takes) and let N through with
N tickets. Unset, a failpoint is one environment lookup."""

from __future__ import annotations

import os
import time
from pathlib import Path


def hold(env: str, mark: str | None = None, timeout_s: float | None = None) -> None:
    """Wait at the failpoint named by `env` (if it is set), leaving `mark` in its folder first."""
    folder = os.environ.get(env)
    if not folder:
        return
    if mark:
        Path(folder, mark).touch()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not Path(folder, "go").exists() and not take_ticket(Path(folder)):
        if deadline is not None and time.monotonic() > deadline:
            return
        time.sleep(0.02)


def take_ticket(folder: Path) -> bool:
    """Atomically take one `ticket-*` file of `folder` (a rename wins for exactly one process)."""
    for ticket in sorted(folder.glob("ticket-*")):
        try:
            ticket.rename(folder / f"taken-{ticket.name}-{os.getpid()}")
            return True
        except FileNotFoundError:
            continue
    return False
