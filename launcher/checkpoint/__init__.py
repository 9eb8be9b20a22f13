"""Checkpoints: their format and verification, save and load, resharding across layouts, consolidation, export."""
