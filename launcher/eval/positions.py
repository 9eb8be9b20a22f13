"""Loss by position inside the document: power-of-two buckets of token positions.

Bucket 0 holds positions 0-127, then each bucket doubles: 128-255, 256-511, ... up to the
window length. A token's position is the one its RoPE sees (data/batch.py: restarted at each
packed document), so the buckets say how well the model predicts the n-th token of a document.
"""

from __future__ import annotations

import torch

FIRST_BUCKET = 128
"""Positions below this share bucket 0: a few short-context tokens need no finer split."""


def bucket_count(seq_len: int) -> int:
    """Buckets needed for positions 0 .. seq_len - 1."""
    return int(bucket_of(torch.tensor([seq_len - 1]))) + 1


def bucket_bounds(seq_len: int) -> list[tuple[int, int]]:
    """Each bucket's (first, last) position, the last bucket cut at seq_len - 1."""
    bounds, lo = [], 0
    for i in range(bucket_count(seq_len)):
        hi = FIRST_BUCKET - 1 if i == 0 else 2 * lo - 1
        bounds.append((lo, min(hi, seq_len - 1)))
        lo = hi + 1
    return bounds


def bucket_of(positions: torch.Tensor) -> torch.Tensor:
    """int64 positions (any shape) -> their bucket indices (same shape)."""
    # floor(log2(p)) is exact in float64 for any position a window can hold (< 2^52)
    octave = torch.floor(torch.log2(positions.clamp(min=1).double())).long()
    return (octave - (FIRST_BUCKET.bit_length() - 2)).clamp(min=0)


def metric_names(seq_len: int) -> list[str]:
    """MLflow metric names, one per bucket: eval_loss_pos_<first>_<last>."""
    return [f"eval_loss_pos_{lo}_{hi}" for lo, hi in bucket_bounds(seq_len)]
