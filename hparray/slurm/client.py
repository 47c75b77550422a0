"""The Slurm client: every Slurm command runs through `run_command` (sbatch, squeue, scancel,
scontrol, sinfo), and their answers are parsed here; nothing here decides anything about a sweep.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from hparray.errors import SlurmError

# Slurm's default; read from `scontrol show config` where Slurm answers.
DEFAULT_MAX_ARRAY_SIZE = 1001
SQUEUE_FORMAT = "%i|%A|%F|%K|%T|%r|%S"
# States in which the task's processes exist. A requeued task is PENDING: its old worker is gone.
ALIVE_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                          "STAGE_OUT", "RESIZING"})
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
# A worker that registered this long before its task's current start belongs to an earlier run of
COMMAND_TIMEOUT_S = 120.0


class SlurmUnavailable(SlurmError):
    """A Slurm command is missing or Slurm does not answer."""


def parse_sbatch(output: str) -> str:
    """The job id from `sbatch --parsable`: `123` or `123;cluster`."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    match = re.fullmatch(r"(\d+)(;\S+)?", lines[-1]) if lines else None
    if match is None:
        raise SlurmError(f"sbatch printed {output.strip()!r} instead of a job id: submit by hand to see why")
    return match.group(1)


def parse_max_array_size(config_text: str) -> int:
    """MaxArraySize from `scontrol show config`, or Slurm's default when it is not there."""
    match = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", config_text, re.M)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


@dataclass(frozen=True)
class SlurmTask:
    """One line of `squeue -r`: an array task (or a plain job) and its state."""

    key: str                     # %i: 123_4 for array tasks, 123 for plain jobs
    job_id: str                  # %A: the task's own job id (SLURM_JOB_ID inside it)
    array_job_id: str            # %F
    array_task_id: str | None    # %K, None for plain jobs
    state: str                   # %T
    reason: str                  # %r
    started_at: float | None     # %S: start of the current run (a requeued task starts again)

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    @property
    def queued(self) -> bool:
        return self.state in QUEUED_STATES


def _timestamp(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:  # N/A, Unknown, None
        return None


def parse_squeue(output: str) -> dict[str, SlurmTask]:
    """`squeue -h -r -o SQUEUE_FORMAT` lines -> tasks by %i."""
    tasks: dict[str, SlurmTask] = {}
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 6:
            continue
        key, job_id, array_job_id, array_task_id, state, reason = parts[:6]
        started = _timestamp(parts[6]) if len(parts) > 6 else None
        task_id = array_task_id if array_task_id.isdigit() else None
        # A state may carry a suffix on some versions (CANCELLED by 0): keep the word.
        tasks[key] = SlurmTask(key=key, job_id=job_id, array_job_id=array_job_id, array_task_id=task_id,
                               state=state.split()[0] if state else "", reason=reason, started_at=started)
    return tasks


def run_command(argv: Sequence[str], *, stdin: str | None = None, env: dict[str, str] | None = None,
             timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run one Slurm client command; a missing command is SlurmUnavailable."""
    if shutil.which(argv[0]) is None:
        raise SlurmUnavailable(f"{argv[0]} not found on PATH: run this on a Slurm login node")
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"{argv[0]} did not answer within {timeout:.0f} s: is slurmctld up? "
                               "(`scontrol ping`)") from None
    except OSError as err:
        raise SlurmUnavailable(f"{argv[0]} could not run ({err.strerror}): check the Slurm client install") from None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def query_jobs(job_ids: Iterable[str]) -> dict[str, SlurmTask]:
    """Every task of these jobs that Slurm still knows, in ONE squeue call (by %i).

    A job Slurm has forgotten (finished longer than MinJobAge ago, or cancelled while pending)
    is simply absent; squeue's 'Invalid job id specified', which it gives when it knows none of
    them, means the same. Needs no sacct.
    """
    ids = sorted({str(job_id) for job_id in job_ids if job_id})
    if not ids:
        return {}
    result = run_command(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", SQUEUE_FORMAT])
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return {}
        raise SlurmUnavailable(f"squeue failed: {last_line(result.stderr or result.stdout)}")
    return parse_squeue(result.stdout)


def max_array_size() -> int:
    """This cluster's MaxArraySize (Slurm's default when scontrol cannot tell)."""
    try:
        result = run_command(["scontrol", "show", "config"], timeout=30)
    except SlurmUnavailable:
        return DEFAULT_MAX_ARRAY_SIZE
    return parse_max_array_size(result.stdout) if result.returncode == 0 else DEFAULT_MAX_ARRAY_SIZE



@dataclass(frozen=True)
class NodeShape:
    """What one node of a partition offers an array task."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int


def parse_sinfo_nodes(output: str, partition: str | None) -> list[NodeShape]:
    """`sinfo -h -N -o '%P|%N|%c|%m|%G'` lines of `partition` (None: the default one, marked *)."""
    nodes = []
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5:
            continue
        name, node, cpus, mem, gres = parts[:5]
        if (partition is None and not name.endswith("*")) or (partition is not None and name.rstrip("*") != partition):
            continue
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,()]+)?:(\d+)", gres))
        nodes.append(NodeShape(node, int(re.sub(r"\D.*", "", cpus) or 0), int(re.sub(r"\D.*", "", mem) or 0), gpus))
    return nodes



def partition_nodes(partition: str | None) -> list[NodeShape]:
    """The nodes of `partition` (None: the default one) as sinfo lists them; [] when it cannot tell."""
    try:
        result = run_command(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"], timeout=30)
    except SlurmUnavailable:
        return []
    return parse_sinfo_nodes(result.stdout, partition) if result.returncode == 0 else []
