"""Weight initialisation shared by the model files."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std^2), in the form megatron-core's layers take (`init_method`)."""
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)
