"""The sbatch template that `ithaca submit` fills in (job.sbatch)."""
