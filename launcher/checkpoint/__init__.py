"""Checkpoints: save and load with verification, resharding across layouts, consolidation, export."""
