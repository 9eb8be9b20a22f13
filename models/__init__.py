"""Model definitions; attention is handed in, so models never communicate themselves.

The model itself is `ithaca.models.llama.Llama` (it imports megatron-core); only the light
architecture dataclasses are re-exported here so that loading a config stays fast.
"""

from ithaca.models.llama_args import LlamaArgs
from ithaca.models.rope_scaling import RopeScaling

__all__ = ["LlamaArgs", "RopeScaling"]
