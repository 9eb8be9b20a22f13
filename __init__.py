"""Ithaca: distributed pretraining for long sequences.

The repository root is this package; its folders are the subpackages (`ithaca.launcher`,
`ithaca.parallel`, `ithaca.models`, `ithaca.kernels`, `ithaca.data`). See README.md.
"""

__version__ = "0.1.0"
