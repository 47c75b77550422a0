"""hparray: resumable Slurm job-array sweeps of per-video test-time fine-tuning."""

__version__ = "0.1.0"
