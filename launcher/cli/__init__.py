"""The `ithaca` command line: its verbs and flags (main), and SLURM job submission."""
