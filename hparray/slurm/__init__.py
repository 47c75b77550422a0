"""The Slurm adapter: the job-array script (`script`), the Slurm client (`client`: sbatch, squeue,
scancel, scontrol, sinfo and their answers) and what a sweep does with them (`sweep`: submit,
the Slurm-aware reaper, cancel, the checks that refuse an array before it is queued)."""

from hparray.config import slurm_seconds
from hparray.slurm.client import (
    DEFAULT_MAX_ARRAY_SIZE,
    NodeShape,
    SlurmTask,
    SlurmUnavailable,
    parse_max_array_size,
    parse_sbatch,
    parse_sinfo_nodes,
    parse_squeue,
    query_jobs,
)
from hparray.slurm.script import Overrides, SlurmOptionError, log_dir_of, normalise_directive, render_script
from hparray.slurm.sweep import (
    Backend,
    Cancellation,
    SlurmReap,
    SlurmView,
    Submission,
    cancel,
    check_partition_fits,
    check_time_limit,
    choose_backend,
    claimable_rows,
    expected_row_s,
    hide_db_password,
    hung_rows,
    observe,
    reap,
    split_arrays,
    submit,
)

__all__ = [
    "DEFAULT_MAX_ARRAY_SIZE", "Backend", "Cancellation", "NodeShape", "Overrides", "SlurmOptionError", "SlurmReap",
    "SlurmTask", "SlurmUnavailable", "SlurmView", "Submission", "cancel", "check_partition_fits", "check_time_limit",
    "choose_backend", "claimable_rows", "expected_row_s", "hide_db_password", "hung_rows", "log_dir_of",
    "normalise_directive", "observe", "parse_max_array_size", "parse_sbatch", "parse_sinfo_nodes", "parse_squeue",
    "query_jobs", "reap", "render_script", "slurm_seconds", "split_arrays", "submit",
]
