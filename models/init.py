"""Weight initialisation shared by the model files."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std^2), in the form megatron-core's layers take (`init_method`)."""
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


@contextmanager
def part_seed(seed: int, part: int) -> Iterator[None]:
    """Draw one part of a model (embedding, a block, the head) from its own stream, derived from
    `seed` and the part's index, leaving the global generator as it was: a pipeline stage that
    builds only some parts gets exactly the weights the whole model has."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + part)
        yield
