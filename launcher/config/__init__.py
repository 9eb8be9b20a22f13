"""The run config: typed sections, the YAML loader with `--set`, and the checks that need the run's facts."""
