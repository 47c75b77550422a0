"""One exception root: the CLI turns every HparrayError into one line and an exit code.

Bad input (exit 2) is something the user can fix by editing a file or a flag; a runtime
failure (exit 1) is something that went wrong while doing the work.
"""

from __future__ import annotations


class HparrayError(Exception):
    """Root of every error hparray reports to the user; `exit_code` says which kind."""

    exit_code = 1


class BadInput(HparrayError):
    """The user's input is wrong; the message names the file or flag and the fix."""

    exit_code = 2


class ConfigError(BadInput):
    """A YAML config is malformed or impossible."""


class VideoError(BadInput):
    """A video source or file cannot be used (missing, unreadable, too short)."""


class StoreError(HparrayError):
    """The database cannot be opened, migrated or written."""


class StoreUnreachable(StoreError, BadInput):
    """The database URL points nowhere usable (bad URL, server down, not a database)."""

    exit_code = 2


class RunnerError(HparrayError):
    """The experiment runner failed to load or to run a task."""


class RunnerSetupError(RunnerError, BadInput):
    """The runner cannot start with these settings (an import, an executable, a checkpoint is
    missing): found by `plan` and `submit` before any GPU time is spent."""

    exit_code = 2


class MetricsError(HparrayError):
    """Metrics cannot be computed honestly (e.g. LPIPS weights missing or not genuine)."""


class WorkerStopped(HparrayError):
    """A worker stopped on purpose, for a reason that restarting it here would not fix (its configs
    differ from the plan, or the circuit breaker tripped): supervisors must not respawn it."""

    exit_code = 3


class OutputError(HparrayError):
    """A result file cannot be written (a full disk, no permission); the message names the path."""


class SlurmError(HparrayError):
    """A Slurm command failed or Slurm cannot be reached."""


class MissingExtra(BadInput):
    """An optional extra that this command needs is not installed; the message names the pip line."""


class ExportError(HparrayError):
    """An experiment tracker refused or failed an export (its store, server or files)."""
