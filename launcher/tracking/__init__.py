"""MLflow tracking that never waits on MLflow: the tracker, its on-disk journal, and pushing a journal."""
