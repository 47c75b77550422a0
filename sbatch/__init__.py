"""Package data, shipped in the wheel as `hparray.sbatch`: the job-array script template."""
