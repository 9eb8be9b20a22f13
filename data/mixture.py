"""A weighted mixture of datasets: which dataset each window of a stream comes from.

Window k of stream s comes from dataset i with probability weight_i / sum(weights), drawn from
random numbers that depend only on (seed, stream, k // BLOCK): any window's choice can be
recomputed without replaying the ones before it, and a resumed stream draws the same choices.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

BLOCK = 4096
_MIXTURE = 2  # keeps these random streams apart from data/split.py's


def mixture_choices(weights: Sequence[float], seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Dataset indices [count] for windows start .. start+count-1 of `stream`."""
    if len(weights) == 1:
        return np.zeros(count, dtype=np.int64)
    bounds = np.cumsum(weights) / np.sum(weights)
    out = np.empty(count, dtype=np.int64)
    for i, k in enumerate(range(start, start + count)):
        block, index = divmod(k, BLOCK)
        out[i] = np.searchsorted(bounds, _uniforms(seed, stream, block)[index], side="right")
    return np.minimum(out, len(weights) - 1)  # bounds[-1] may round to just under 1.0


@lru_cache(maxsize=2)
def _uniforms(seed: int, stream: int, block: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, block, _MIXTURE]).random(BLOCK)
