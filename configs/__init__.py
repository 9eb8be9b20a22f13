"""Ready-made run configs (YAML); `ithaca train --config debug-cpu` finds them by name."""
