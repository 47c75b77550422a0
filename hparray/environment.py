"""What this process runs on: the host, its filesystems, its GPUs, the Slurm job around it.

Probing the machine is kept in one place, so the store, the worker and doctor ask the same
questions the same way (and tests can see what is asked).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "fuse.sshfs",
    "glusterfs", "fuse.glusterfs", "panfs", "9p", "afs", "fuse.ceph", "wekafs", "fuse.juicefs",
}


def this_host() -> str:
    """This machine's name as workers record it (and as a reaper names the clock it judges by)."""
    return socket.gethostname().split(".")[0]


def filesystem_type(path: Path) -> str:
    """The filesystem type holding `path`, from /proc/mounts (longest matching mount point)."""
    path = path.resolve()
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def visible_gpus() -> list[str]:
    """GPU indices this machine offers: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def visible_gpu_memory_gib() -> float | None:
    """Total memory of the smallest GPU this process sees (`nvidia-smi`), None without one."""
    if not visible_gpus() or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = {gpu.strip() for gpu in listed.split(",")} if listed is not None else None
    sizes = []
    for line in out.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3 and (wanted is None or parts[0] in wanted or parts[1] in wanted):
            try:
                sizes.append(float(parts[2]) / 1024)
            except ValueError:
                continue
    return min(sizes) if sizes else None


def default_device() -> str:
    """'cuda' when this process sees a GPU, else 'cpu'; torch is imported only when a GPU may be
    there, so workers of light runners start in a second rather than five."""
    if not visible_gpus():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def job_deadline() -> float | None:
    """When the Slurm job running this process ends (unix time), or None outside Slurm."""
    end = os.environ.get("SLURM_JOB_END_TIME")
    if end and end.isdigit():
        return float(end)
    return None


@dataclass(frozen=True)
class WorkerIdentity:
    """Who a worker is, for `status`: host, pid, GPU and the Slurm ids when under Slurm."""

    id: str
    host: str
    pid: int
    gpu: str | None
    slurm: dict[str, str | None]

    @classmethod
    def from_environment(cls, worker_id: str | None = None) -> WorkerIdentity:
        env = os.environ
        host = this_host()
        slurm = {"job_id": env.get("SLURM_JOB_ID"), "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
                 "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
                 "restart_count": env.get("SLURM_RESTART_COUNT")}
        if slurm["array_job_id"]:
            tag = f"{slurm['array_job_id']}_{slurm['array_task_id']}"
        elif slurm["job_id"]:
            tag = slurm["job_id"]
        else:
            tag = "local"
        return cls(id=worker_id or f"{host}-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}", host=host, pid=os.getpid(),
                   gpu=env.get("CUDA_VISIBLE_DEVICES"), slurm=slurm)
